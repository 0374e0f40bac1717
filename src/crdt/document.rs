//! JSON documents stored as automerge documents: merging saved siblings, applying
//! RFC 7396 merge patches, and reading the merged result back as JSON.
//!
//! Strings are stored as automerge scalar strings rather than text objects: a merge
//! patch replaces a string wholesale, so character-level merging would buy nothing.
//!
//! Concurrent edits combine field by field only inside maps both replicas already share:
//! if two replicas each create the same missing nested object, automerge keeps one of the
//! two new maps, as it does for any concurrent write to one field.

use std::any::Any;
use std::borrow::Cow;
use std::panic::{self, AssertUnwindSafe};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{
    ActorId, AutoCommit, AutomergeError, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value,
};
use serde_json::{Map, Number, Value as Json};

/// Why a document operation failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DocumentError {
    /// Stored or received bytes are not a valid automerge document (or siblings cannot be
    /// merged); no state is changed.
    #[error("document bytes are corrupt: {0}")]
    Corrupt(String),
    /// The patch (or the resulting document root) is not a JSON object; no state is changed.
    #[error("a document patch must be a JSON object")]
    NotAnObject,
    /// Nesting is deeper than `max` levels; no state is changed.
    #[error("document nesting exceeds {max} levels")]
    TooDeep {
        /// The nesting limit that was exceeded.
        max: usize,
    },
    /// A number automerge cannot represent (such as a non-finite float); no state is changed.
    #[error("unsupported JSON number: {0}")]
    BadNumber(String),
}

impl From<AutomergeError> for DocumentError {
    /// Treats every automerge failure as corruption: our own edits only touch objects we
    /// just looked up or created, so a failure means the loaded document was inconsistent.
    fn from(error: AutomergeError) -> Self {
        DocumentError::Corrupt(error.to_string())
    }
}

/// The deepest nesting of objects and arrays a patch or document may have; the root object
/// is level 1.
pub const MAX_DEPTH: usize = 64;

/// Loads and merges `siblings`, applies `patch` as an RFC 7396 merge patch authored by
/// `actor`, and returns the saved bytes of the resulting document.
///
/// The merged state does not depend on the order of `siblings`. The commit carries no
/// timestamp, so the output depends only on the inputs.
pub(crate) fn apply_merge_patch(
    siblings: &[&[u8]],
    actor: &[u8],
    patch: &Json,
) -> Result<Vec<u8>, DocumentError> {
    let Json::Object(fields) = patch else {
        return Err(DocumentError::NotAnObject);
    };
    // Checked up front so the recursive writers below are bounded.
    check_depth(patch)?;
    shielded(|| {
        let mut doc = merged(siblings)?.unwrap_or_default();
        doc.set_actor(ActorId::from(actor));
        merge_object(&mut doc, &ROOT, fields)?;
        doc.commit_with(CommitOptions::default());
        Ok(doc.save())
    })
}

/// Loads and merges `siblings` and returns the document root as a JSON object.
///
/// Empty `siblings` is an empty object.
pub(crate) fn to_json(siblings: &[&[u8]]) -> Result<Json, DocumentError> {
    shielded(|| match merged(siblings)? {
        Some(doc) => map_to_json(&doc, &ROOT, 1),
        None => Ok(Json::Object(Map::new())),
    })
}

/// Checks that `bytes` load as an automerge document.
pub(crate) fn validate(bytes: &[u8]) -> Result<(), DocumentError> {
    shielded(|| load(bytes).map(drop))
}

/// Runs `operation`, reporting a panic inside automerge as [`DocumentError::Corrupt`].
///
/// automerge 0.12 panics instead of failing on some malformed bytes that carry a valid
/// checksum, and siblings can arrive from untrusted peers. The default panic hook still
/// prints the message; it is global, so it is not ours to silence.
fn shielded<T>(operation: impl FnOnce() -> Result<T, DocumentError>) -> Result<T, DocumentError> {
    // Asserting unwind safety is sound: every document `operation` touches is created
    // inside it and dropped during the unwind, so no half-updated state escapes.
    panic::catch_unwind(AssertUnwindSafe(operation))
        .unwrap_or_else(|payload| Err(DocumentError::Corrupt(panic_message(payload.as_ref()))))
}

/// The text of a panic payload, for the error it is turned into.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    let detail = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message");
    format!("automerge panicked: {detail}")
}

/// Loads one saved document.
fn load(bytes: &[u8]) -> Result<AutoCommit, DocumentError> {
    // automerge loads zero bytes as a fresh empty document, but `save` never produces
    // them, so empty input can only be damage.
    if bytes.is_empty() {
        return Err(DocumentError::Corrupt("empty document bytes".to_owned()));
    }
    Ok(AutoCommit::load(bytes)?)
}

/// Loads every sibling and merges them into the first; `None` when there are none.
///
/// automerge gives each loaded document a random actor id; it never reaches the output,
/// because callers set their own actor before editing and `save` drops unused actors.
fn merged(siblings: &[&[u8]]) -> Result<Option<AutoCommit>, DocumentError> {
    let Some((first, rest)) = siblings.split_first() else {
        return Ok(None);
    };
    let mut doc = load(first)?;
    for bytes in rest {
        doc.merge(&mut load(bytes)?)?;
    }
    Ok(Some(doc))
}

/// Fails when `value` nests objects and arrays deeper than [`MAX_DEPTH`].
///
/// Iterative, so that an absurdly deep value cannot overflow the stack here.
fn check_depth(value: &Json) -> Result<(), DocumentError> {
    let mut pending = vec![(value, 1)];
    while let Some((value, depth)) = pending.pop() {
        let children: Box<dyn Iterator<Item = &Json>> = match value {
            Json::Object(fields) => Box::new(fields.values()),
            Json::Array(items) => Box::new(items.iter()),
            _ => continue,
        };
        if depth > MAX_DEPTH {
            return Err(too_deep());
        }
        pending.extend(children.map(|child| (child, depth + 1)));
    }
    Ok(())
}

/// The error for nesting beyond [`MAX_DEPTH`].
fn too_deep() -> DocumentError {
    DocumentError::TooDeep { max: MAX_DEPTH }
}

/// Applies merge-patch `fields` to the map `obj`: null deletes, an object merges, anything
/// else replaces.
fn merge_object(
    doc: &mut AutoCommit,
    obj: &ObjId,
    fields: &Map<String, Json>,
) -> Result<(), DocumentError> {
    for (key, value) in fields {
        match value {
            // automerge treats deleting an absent key as a no-op.
            Json::Null => doc.delete(obj, key.as_str())?,
            Json::Object(nested) => {
                let map = map_field(doc, obj, key)?;
                merge_object(doc, &map, nested)?;
            }
            _ => write_value(doc, obj, Slot::Field(key), value)?,
        }
    }
    Ok(())
}

/// The map stored at `key` in `obj`, replacing whatever else is there with a new map.
fn map_field(doc: &mut AutoCommit, obj: &ObjId, key: &str) -> Result<ObjId, DocumentError> {
    // Reusing the existing map (rather than recreating it) is what lets concurrent edits
    // to different fields of a nested object both survive a merge.
    if let Some((Value::Object(ObjType::Map | ObjType::Table), id)) = doc.get(obj, key)? {
        return Ok(id);
    }
    Ok(doc.put_object(obj, key, ObjType::Map)?)
}

/// Where a new value goes: a map field (replacing it) or a list position (inserting there).
#[derive(Clone, Copy)]
enum Slot<'a> {
    /// A field of a map.
    Field(&'a str),
    /// A position in a list.
    Insert(usize),
}

/// Writes `value` verbatim into `slot` of `parent`; nulls inside it are stored as nulls,
/// since merge-patch semantics stop at the first non-object value.
fn write_value(
    doc: &mut AutoCommit,
    parent: &ObjId,
    slot: Slot<'_>,
    value: &Json,
) -> Result<(), DocumentError> {
    match value {
        Json::Array(items) => {
            let list = create_object(doc, parent, slot, ObjType::List)?;
            for (index, item) in items.iter().enumerate() {
                write_value(doc, &list, Slot::Insert(index), item)?;
            }
        }
        Json::Object(fields) => {
            let map = create_object(doc, parent, slot, ObjType::Map)?;
            for (key, field) in fields {
                write_value(doc, &map, Slot::Field(key), field)?;
            }
        }
        _ => {
            let scalar = to_scalar(value)?;
            match slot {
                Slot::Field(key) => doc.put(parent, key, scalar)?,
                Slot::Insert(index) => doc.insert(parent, index, scalar)?,
            }
        }
    }
    Ok(())
}

/// Creates a new empty object of type `kind` in `slot` of `parent`.
fn create_object(
    doc: &mut AutoCommit,
    parent: &ObjId,
    slot: Slot<'_>,
    kind: ObjType,
) -> Result<ObjId, DocumentError> {
    let id = match slot {
        Slot::Field(key) => doc.put_object(parent, key, kind)?,
        Slot::Insert(index) => doc.insert_object(parent, index, kind)?,
    };
    Ok(id)
}

/// The automerge scalar for a JSON scalar (callers handle arrays and objects).
fn to_scalar(value: &Json) -> Result<ScalarValue, DocumentError> {
    let scalar = match value {
        Json::Bool(flag) => ScalarValue::Boolean(*flag),
        Json::String(text) => ScalarValue::Str(text.as_str().into()),
        Json::Number(number) => number_to_scalar(number)?,
        Json::Null => ScalarValue::Null,
        // Never reached: `write_value` turns containers into automerge objects first.
        Json::Array(_) | Json::Object(_) => ScalarValue::Null,
    };
    Ok(scalar)
}

/// The narrowest automerge number for `number`: i64, then u64, then a finite f64.
fn number_to_scalar(number: &Number) -> Result<ScalarValue, DocumentError> {
    if let Some(int) = number.as_i64() {
        return Ok(ScalarValue::Int(int));
    }
    if let Some(uint) = number.as_u64() {
        return Ok(ScalarValue::Uint(uint));
    }
    // Non-finite values only reach here if serde_json's arbitrary_precision feature is on.
    match number.as_f64() {
        Some(float) if float.is_finite() => Ok(ScalarValue::F64(float)),
        _ => Err(DocumentError::BadNumber(number.to_string())),
    }
}

/// The JSON object for the map `obj`, which sits at nesting level `depth`.
fn map_to_json(doc: &AutoCommit, obj: &ObjId, depth: usize) -> Result<Json, DocumentError> {
    // Loaded bytes may come from anywhere, so bound the recursion here too.
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    let mut fields = Map::new();
    for key in doc.keys(obj) {
        // `get` picks automerge's deterministic winner among conflicting values.
        if let Some((value, id)) = doc.get(obj, key.as_str())? {
            let json = value_to_json(doc, value, &id, depth)?;
            fields.insert(key, json);
        }
    }
    Ok(Json::Object(fields))
}

/// The JSON array for the list `obj`, which sits at nesting level `depth`.
fn list_to_json(doc: &AutoCommit, obj: &ObjId, depth: usize) -> Result<Json, DocumentError> {
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    let mut items = Vec::new();
    for index in 0..doc.length(obj) {
        if let Some((value, id)) = doc.get(obj, index)? {
            items.push(value_to_json(doc, value, &id, depth)?);
        }
    }
    Ok(Json::Array(items))
}

/// The JSON for `value` (whose object id is `id`) found inside a container at level `depth`.
fn value_to_json(
    doc: &AutoCommit,
    value: Value<'_>,
    id: &ObjId,
    depth: usize,
) -> Result<Json, DocumentError> {
    match value {
        Value::Object(ObjType::Map | ObjType::Table) => map_to_json(doc, id, depth + 1),
        Value::Object(ObjType::List) => list_to_json(doc, id, depth + 1),
        Value::Object(ObjType::Text) => Ok(Json::String(doc.text(id)?)),
        Value::Scalar(scalar) => Ok(scalar_to_json(scalar)),
    }
}

/// The JSON for an automerge scalar.
///
/// JSON has no byte strings, NaN or infinities: bytes become an array of numbers and
/// non-finite floats become null (as `serde_json` itself does), so reads never fail on them.
fn scalar_to_json(scalar: Cow<'_, ScalarValue>) -> Json {
    match scalar.as_ref() {
        ScalarValue::Bytes(bytes) => Json::Array(bytes.iter().map(|&b| Json::from(b)).collect()),
        ScalarValue::Str(text) => Json::String(text.to_string()),
        ScalarValue::Int(int) | ScalarValue::Timestamp(int) => Json::from(*int),
        ScalarValue::Uint(uint) => Json::from(*uint),
        ScalarValue::F64(float) => Number::from_f64(*float).map_or(Json::Null, Json::Number),
        ScalarValue::Counter(counter) => Json::from(i64::from(counter)),
        ScalarValue::Boolean(flag) => Json::Bool(*flag),
        // A value type from a newer automerge that we cannot interpret.
        ScalarValue::Unknown { .. } | ScalarValue::Null => Json::Null,
    }
}

/// Tests for merging, merge-patch semantics, hydration and hostile input.
#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Applies `patch` as `actor` to the single document `base` (or a new one).
    fn edit(base: Option<&[u8]>, actor: &[u8], patch: Json) -> Vec<u8> {
        let siblings: Vec<&[u8]> = base.into_iter().collect();
        apply_merge_patch(&siblings, actor, &patch).expect("valid test patch")
    }

    /// Reads the merged JSON of `siblings`.
    fn read(siblings: &[&[u8]]) -> Json {
        to_json(siblings).expect("valid test siblings")
    }

    /// A patch of `depth` nested objects, counting the outermost.
    fn nested(depth: usize) -> Json {
        (1..depth).fold(json!({}), |inner, _| json!({ "n": inner }))
    }

    /// Whether `result` failed as corrupt.
    fn is_corrupt<T>(result: &Result<T, DocumentError>) -> bool {
        matches!(result, Err(DocumentError::Corrupt(_)))
    }

    /// Decodes a hex string.
    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|at| u8::from_str_radix(&text[at..at + 2], 16).expect("test hex"))
            .collect()
    }

    /// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[0]
            })
            .collect()
    }

    /// Concurrent edits to different fields both appear, whatever the sibling order.
    #[test]
    fn concurrent_edits_to_different_fields_both_survive() {
        let base = edit(None, b"base", json!({"a": 0, "b": 0, "c": "kept"}));
        let x = edit(Some(&base), b"x", json!({"a": 1}));
        let y = edit(Some(&base), b"y", json!({"b": 2}));
        let merged = read(&[&x, &y]);
        assert_eq!(merged, json!({"a": 1, "b": 2, "c": "kept"}));
        assert_eq!(merged, read(&[&y, &x]));
    }

    /// Concurrent edits inside a shared nested map both appear.
    #[test]
    fn concurrent_edits_to_nested_fields_both_survive() {
        let base = edit(None, b"base", json!({"m": {"keep": true}}));
        let x = edit(Some(&base), b"x", json!({"m": {"a": 1}}));
        let y = edit(Some(&base), b"y", json!({"m": {"b": 2}}));
        let expected = json!({"m": {"keep": true, "a": 1, "b": 2}});
        assert_eq!(read(&[&x, &y]), expected);
        assert_eq!(read(&[&y, &x]), expected);
    }

    /// Concurrent writes to one field pick the same winner in every sibling order.
    #[test]
    fn concurrent_writes_to_one_field_resolve_regardless_of_order() {
        let base = edit(None, b"base", json!({"f": "start"}));
        let x = edit(Some(&base), b"x", json!({"f": "from x"}));
        let y = edit(Some(&base), b"y", json!({"f": "from y"}));
        let z = edit(Some(&base), b"z", json!({"f": {"from": "z"}}));
        let first = read(&[&x, &y, &z]);
        for order in [
            [&x, &z, &y],
            [&y, &x, &z],
            [&y, &z, &x],
            [&z, &x, &y],
            [&z, &y, &x],
        ] {
            let siblings: Vec<&[u8]> = order.iter().map(|s| s.as_slice()).collect();
            assert_eq!(read(&siblings), first);
        }
        let winner = &first["f"];
        assert!(
            [json!("from x"), json!("from y"), json!({"from": "z"})].contains(winner),
            "unexpected winner {winner}"
        );
    }

    /// Editing merged siblings gives the same state in either order.
    #[test]
    fn merged_edit_result_does_not_depend_on_sibling_order() {
        let base = edit(None, b"base", json!({"a": 0}));
        let x = edit(Some(&base), b"x", json!({"a": 1}));
        let y = edit(Some(&base), b"y", json!({"a": 2, "b": 3}));
        let patch = json!({"c": 4});
        let xy = apply_merge_patch(&[&x, &y], b"w1", &patch).expect("valid");
        let yx = apply_merge_patch(&[&y, &x], b"w2", &patch).expect("valid");
        assert_eq!(read(&[&xy]), read(&[&yx]));
        assert_eq!(read(&[&xy])["c"], json!(4));
    }

    /// A sibling that is an ancestor (or duplicate) of another adds nothing.
    #[test]
    fn merging_a_document_with_its_descendant_keeps_the_descendant() {
        let base = edit(None, b"base", json!({"a": 1}));
        let later = edit(Some(&base), b"x", json!({"a": 2}));
        assert_eq!(read(&[&base, &later]), json!({"a": 2}));
        assert_eq!(read(&[&later, &base, &later]), json!({"a": 2}));
    }

    /// Null deletes a field and nested objects merge field by field.
    #[test]
    fn null_deletes_and_nested_objects_merge() {
        let base = edit(
            None,
            b"1",
            json!({"a": 1, "m": {"x": 1, "y": 2}, "gone": true}),
        );
        let next = edit(
            Some(&base),
            b"2",
            json!({"gone": null, "m": {"x": null, "z": 3}}),
        );
        assert_eq!(read(&[&next]), json!({"a": 1, "m": {"y": 2, "z": 3}}));
    }

    /// Null for a missing field changes nothing, though its parent object is created.
    #[test]
    fn deleting_an_absent_field_is_a_no_op() {
        let doc = edit(None, b"1", json!({"missing": null, "m": {"also": null}}));
        assert_eq!(read(&[&doc]), json!({"m": {}}));
    }

    /// Arrays, scalars and objects replace whatever was there.
    #[test]
    fn arrays_and_scalars_replace() {
        let base = edit(
            None,
            b"1",
            json!({"l": [1, 2, 3], "s": {"deep": 1}, "n": 5}),
        );
        let next = edit(
            Some(&base),
            b"2",
            json!({"l": [4], "s": "flat", "n": {"now": "map"}}),
        );
        assert_eq!(
            read(&[&next]),
            json!({"l": [4], "s": "flat", "n": {"now": "map"}})
        );
    }

    /// Every JSON value type reads back as written, nulls inside arrays included.
    #[test]
    fn values_round_trip_through_automerge() {
        let value = json!({
            "str": "héllo",
            "t": true,
            "f": false,
            "int": -7,
            "big": u64::MAX,
            "float": 1.5,
            "list": [null, {"inner": null, "k": [1, "two"]}, [], {}],
            "empty": {},
        });
        let doc = edit(None, b"1", value.clone());
        assert_eq!(read(&[&doc]), value);
    }

    /// An empty patch on no siblings still saves a loadable document.
    #[test]
    fn empty_patch_on_nothing_is_a_valid_empty_document() {
        let doc = edit(None, b"1", json!({}));
        assert_eq!(validate(&doc), Ok(()));
        assert_eq!(read(&[&doc]), json!({}));
    }

    /// No siblings read as an empty object.
    #[test]
    fn no_siblings_reads_as_an_empty_object() {
        assert_eq!(read(&[]), json!({}));
    }

    /// A patch that is not an object is rejected.
    #[test]
    fn non_object_patches_are_rejected() {
        for patch in [json!(null), json!(1), json!("s"), json!([]), json!(true)] {
            assert_eq!(
                apply_merge_patch(&[], b"1", &patch),
                Err(DocumentError::NotAnObject)
            );
        }
    }

    /// Patches nested beyond MAX_DEPTH, through objects or arrays, are rejected.
    #[test]
    fn nesting_is_limited() {
        assert!(apply_merge_patch(&[], b"1", &nested(MAX_DEPTH)).is_ok());
        let too_deep = Err(DocumentError::TooDeep { max: MAX_DEPTH });
        assert_eq!(
            apply_merge_patch(&[], b"1", &nested(MAX_DEPTH + 1)),
            too_deep
        );
        assert_eq!(apply_merge_patch(&[], b"1", &nested(100)), too_deep);
        let deep_array = (1..100).fold(json!([]), |inner, _| json!([inner]));
        assert_eq!(
            apply_merge_patch(&[], b"1", &json!({ "a": deep_array })),
            too_deep
        );
    }

    /// A document at exactly MAX_DEPTH reads back.
    #[test]
    fn deepest_allowed_document_reads_back() {
        let doc = edit(None, b"1", nested(MAX_DEPTH));
        assert_eq!(read(&[&doc]), nested(MAX_DEPTH));
    }

    /// Empty, random and truncated bytes are reported as corrupt by every entry point.
    #[test]
    fn garbage_bytes_are_corrupt() {
        let valid = edit(None, b"1", json!({"a": [1, 2], "b": {"c": "d"}}));
        let mut inputs: Vec<Vec<u8>> = vec![Vec::new(), vec![0], b"not a document".to_vec()];
        inputs.extend((0..64).map(|seed| noise(seed, (seed as usize * 7) % 300)));
        // The valid magic bytes followed by noise get past the first check.
        inputs.extend((0..64).map(|seed| {
            let mut bytes = valid[..8].to_vec();
            bytes.extend(noise(seed + 1000, 40));
            bytes
        }));
        inputs.extend((0..valid.len()).map(|len| valid[..len].to_vec()));
        for bytes in &inputs {
            assert!(is_corrupt(&validate(bytes)), "validated {bytes:?}");
            assert!(is_corrupt(&to_json(&[bytes])), "read {bytes:?}");
            assert!(
                is_corrupt(&to_json(&[&valid, bytes])),
                "read after valid {bytes:?}"
            );
            let patched = apply_merge_patch(&[&valid, bytes], b"2", &json!({}));
            assert!(is_corrupt(&patched), "patched {bytes:?}");
        }
    }

    /// The same edit of the same siblings saves the same bytes, despite the random actor id
    /// automerge gives every document it loads.
    #[test]
    fn saved_bytes_are_deterministic() {
        let base = edit(None, b"base", json!({"a": {"b": 1}}));
        let x = edit(Some(&base), b"x", json!({"a": {"c": 2}}));
        for patch in [json!({"d": [1, {"e": null}]}), json!({})] {
            let once = apply_merge_patch(&[&base, &x], b"w", &patch).expect("valid");
            let again = apply_merge_patch(&[&base, &x], b"w", &patch).expect("valid");
            assert_eq!(once, again);
        }
    }

    /// Single-bit damage anywhere in a document never panics.
    #[test]
    fn flipped_bits_never_panic() {
        let valid = edit(None, b"1", json!({"a": [1, 2], "b": {"c": "d"}}));
        for index in 0..valid.len() {
            for bit in 0..8 {
                let mut bytes = valid.clone();
                bytes[index] ^= 1 << bit;
                // Either outcome is acceptable; only a panic would fail the test.
                let _ = to_json(&[&bytes]);
            }
        }
    }

    /// Bytes on which automerge itself panics are reported as corrupt.
    #[test]
    fn bytes_that_make_automerge_panic_are_corrupt() {
        // A fuzzed document with a resealed checksum; automerge 0.12 unwraps a decoding
        // error while loading it.
        let bytes = hex(concat!(
            "856f4a83caab0b1200740201610162015b1c180eb7f9eb5faf47fc9adbc3aec745d33cfb4c39b1",
            "13e844d5ce9e3a1eb50701030303130223024003430256020a15032103230234014202560257",
            "028001038101028301027e00017e010002ea02007e00017f0002070201617e00010201020201",
            "021401027e01007f017f01",
        ));
        assert!(is_corrupt(&validate(&bytes)));
        assert!(is_corrupt(&to_json(&[&bytes])));
        assert!(is_corrupt(&apply_merge_patch(&[&bytes], b"1", &json!({}))));
    }

    /// Two different changes with one actor and sequence number cannot be merged.
    #[test]
    fn conflicting_histories_for_one_actor_are_corrupt() {
        let base = edit(None, b"base", json!({}));
        let x = edit(Some(&base), b"same", json!({"a": 1}));
        let y = edit(Some(&base), b"same", json!({"a": 2}));
        assert!(is_corrupt(&to_json(&[&x, &y])));
        let patched = apply_merge_patch(&[&y, &x], b"other", &json!({}));
        assert!(is_corrupt(&patched));
    }

    /// Numbers map to i64, then u64, then f64.
    #[test]
    fn numbers_use_the_narrowest_automerge_type() {
        // BadNumber is unreachable here: without serde_json's arbitrary_precision feature
        // every Number is a finite i64, u64 or f64.
        assert_eq!(
            number_to_scalar(&Number::from_f64(0.25).expect("finite")),
            Ok(ScalarValue::F64(0.25))
        );
        assert_eq!(
            number_to_scalar(&Number::from(u64::MAX)),
            Ok(ScalarValue::Uint(u64::MAX))
        );
    }

    /// Automerge values this module never writes still read as JSON.
    #[test]
    fn other_scalars_hydrate_to_json() {
        let mut doc = AutoCommit::new();
        doc.put(&ROOT, "bytes", ScalarValue::Bytes(vec![1, 255]))
            .expect("put");
        doc.put(&ROOT, "counter", ScalarValue::counter(3))
            .expect("put");
        doc.increment(&ROOT, "counter", 2).expect("increment");
        doc.put(&ROOT, "time", ScalarValue::Timestamp(9))
            .expect("put");
        doc.put(&ROOT, "nan", ScalarValue::F64(f64::NAN))
            .expect("put");
        let text = doc.put_object(&ROOT, "text", ObjType::Text).expect("put");
        doc.splice_text(&text, 0, 0, "abc").expect("splice");
        let bytes = doc.save();
        assert_eq!(
            read(&[&bytes]),
            json!({"bytes": [1, 255], "counter": 5, "time": 9, "nan": null, "text": "abc"})
        );
    }

    /// A stored document nested beyond MAX_DEPTH is refused rather than recursed into.
    #[test]
    fn overly_deep_stored_documents_are_too_deep_to_read() {
        let mut doc = AutoCommit::new();
        let mut obj = ROOT;
        for _ in 0..MAX_DEPTH {
            obj = doc.put_object(&obj, "n", ObjType::Map).expect("put");
        }
        let bytes = doc.save();
        assert_eq!(
            to_json(&[&bytes]),
            Err(DocumentError::TooDeep { max: MAX_DEPTH })
        );
    }
}
