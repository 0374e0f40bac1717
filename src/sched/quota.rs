//! Cluster-wide quotas as escrow: "namespace X uses at most N CPU millis", kept without
//! coordination by splitting the N among members as rights that only their holder consumes.
//!
//! Each member writes one share record per namespace, under a key only it writes: what it
//! consumes, the running totals it granted to each other member, and at most one open request
//! for more rights, addressed to one member. A member's rights are its initial part plus what
//! others granted it minus what it granted; it consumes only up to its rights as it sees them.
//!
//! Why the sum of consumption never exceeds N in any merged state: grant totals only grow, and a
//! member that counted a grant had applied the granter's write, so (causal delivery) every
//! replica that holds the receiver's consumption holds a granter record at least as new. Summed
//! over members, what is counted as received is at most what is recorded as given, and consumption
//! ≤ initial + received − given member by member adds up to ≤ N.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::sched::{Name, Put, SchedError, keys};

/// A namespace's quota, stored under `quotas/<namespace>`. Create it once, before the first job
/// of the namespace: admissions whose claims do not causally follow it do not count against it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSpec {
    /// The namespace; must match the key.
    pub namespace: Name,
    /// The CPU millis the namespace may hold across the cluster at most.
    pub cpu_millis: u64,
    /// The members the rights start with, split evenly (the first in name order get the
    /// remainder). Rights move from them to whoever needs them.
    pub holders: Vec<Name>,
}

/// One member's record for one namespace, stored under `quota-shares/<namespace>/<member>` and
/// written only by that member.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// CPU millis it consumes now.
    #[serde(default)]
    pub consumed: u64,
    /// What it gave to each other member, as running totals.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub grants: BTreeMap<Name, Grant>,
    /// Its latest request for rights (open until its addressee answers it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Request>,
}

/// Rights one member gave another.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// CPU millis given so far, in total. Never decreases.
    pub total: u64,
    /// The sequence number of the receiver's latest request this member answered.
    pub answered: u64,
}

/// A request for rights, addressed to one member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Increases with each new request of the same member.
    pub seq: u64,
    /// The member asked.
    pub to: Name,
    /// CPU millis asked for.
    pub amount: u64,
}

/// A namespace's quota as one replica sees it: the spec and every member's share.
///
/// Operations change a member's [`Share`] (taken with [`Escrow::share`]) and never the escrow
/// itself; [`Escrow::put`] gives the write that publishes the new share.
///
/// ```
/// use std::collections::BTreeSet;
/// use mantissa::sched::{Escrow, Name, QuotaSpec};
/// let (a, b) = (Name::new("a").unwrap(), Name::new("b").unwrap());
/// let spec = QuotaSpec { namespace: Name::new("team").unwrap(), cpu_millis: 1_000, holders: vec![a.clone()] };
/// let escrow = Escrow::new(spec, Default::default());
/// let mut share = escrow.share(&a);
/// escrow.consume(&a, &mut share, 800).unwrap();
/// assert!(escrow.consume(&a, &mut share, 300).is_err()); // only 200 left
/// assert_eq!(escrow.rights(&b), 0);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Escrow {
    spec: QuotaSpec,
    shares: BTreeMap<Name, Share>,
}

impl QuotaSpec {
    /// The rights `member` starts with.
    pub fn initial_rights(&self, member: &Name) -> u64 {
        let holders: BTreeSet<&Name> = self.holders.iter().collect();
        let Some(position) = holders.iter().position(|holder| *holder == member) else {
            return 0;
        };
        let count = holders.len() as u64;
        let extra = u64::from((position as u64) < self.cpu_millis % count);
        self.cpu_millis / count + extra
    }

    /// Checks what the types cannot: someone holds the rights.
    pub fn validate(&self) -> Result<(), SchedError> {
        if self.holders.is_empty() {
            return Err(SchedError::InvalidQuota(format!(
                "quota {} has no holder",
                self.namespace
            )));
        }
        Ok(())
    }
}

impl Escrow {
    /// The escrow of `spec` with these members' shares.
    pub fn new(spec: QuotaSpec, shares: BTreeMap<Name, Share>) -> Self {
        Escrow { spec, shares }
    }

    /// The quota.
    pub fn spec(&self) -> &QuotaSpec {
        &self.spec
    }

    /// `member`'s share as this replica sees it (empty if it has none yet).
    pub fn share(&self, member: &Name) -> Share {
        self.shares.get(member).cloned().unwrap_or_default()
    }

    /// What every other member granted `member`, in total.
    pub fn received(&self, member: &Name) -> u64 {
        self.shares
            .iter()
            .filter(|(giver, _)| *giver != member)
            .filter_map(|(_, share)| share.grants.get(member))
            .fold(0, |sum, grant| sum.saturating_add(grant.total))
    }

    /// The rights `member` holds: its initial part plus what it received minus what it gave.
    pub fn rights(&self, member: &Name) -> u64 {
        self.rights_with(member, &self.share(member))
    }

    /// What `member` could still consume or give if its share were `share`.
    pub fn spare(&self, member: &Name, share: &Share) -> u64 {
        self.rights_with(member, share)
            .saturating_sub(share.consumed)
    }

    /// The rights `member` holds if its share were `share`.
    fn rights_with(&self, member: &Name, share: &Share) -> u64 {
        let given = share
            .grants
            .values()
            .fold(0u64, |sum, grant| sum.saturating_add(grant.total));
        self.spec
            .initial_rights(member)
            .saturating_add(self.received(member))
            .saturating_sub(given)
    }

    /// What `member` consumes.
    pub fn consumed(&self, member: &Name) -> u64 {
        self.shares.get(member).map_or(0, |share| share.consumed)
    }

    /// What `member` may still consume.
    pub fn available(&self, member: &Name) -> u64 {
        self.rights(member).saturating_sub(self.consumed(member))
    }

    /// The namespace's consumption across the cluster, as this replica sees it: never above the
    /// limit.
    pub fn total_consumed(&self) -> u64 {
        self.shares
            .values()
            .fold(0, |sum, share| sum.saturating_add(share.consumed))
    }

    /// Sets the consumption of `member`, whose share is `share`, to `consumed`; an increase
    /// beyond its rights is refused (and `share` left unchanged). This check is the one the
    /// invariant rests on.
    pub fn set_consumed(
        &self,
        member: &Name,
        share: &mut Share,
        consumed: u64,
    ) -> Result<(), SchedError> {
        let rights = self.rights_with(member, share);
        if consumed > share.consumed && consumed > rights {
            return Err(SchedError::InsufficientRights {
                namespace: self.spec.namespace.clone(),
                rights,
                wanted: consumed,
            });
        }
        share.consumed = consumed;
        Ok(())
    }

    /// Consumes `amount` more for `member`, whose share is `share`; refused (and `share`
    /// unchanged) beyond its rights.
    pub fn consume(&self, member: &Name, share: &mut Share, amount: u64) -> Result<(), SchedError> {
        let total = share.consumed.saturating_add(amount);
        self.set_consumed(member, share, total)
    }

    /// Gives back `amount` of consumption.
    pub fn release(&self, share: &mut Share, amount: u64) {
        share.consumed = share.consumed.saturating_sub(amount);
    }

    /// The request `member` has open: made, and not yet answered by a live addressee.
    pub fn open_request<'a>(
        &self,
        member: &Name,
        share: &'a Share,
        live: &BTreeSet<Name>,
    ) -> Option<&'a Request> {
        let request = share.request.as_ref()?;
        let answered = self
            .shares
            .get(&request.to)
            .and_then(|theirs| theirs.grants.get(member))
            .map_or(0, |grant| grant.answered);
        (answered < request.seq && live.contains(&request.to)).then_some(request)
    }

    /// Asks for `amount` more rights on behalf of `member`, from the live member with the most
    /// available rights. Does nothing (returns `false`) while a request is open or nobody has
    /// rights to spare.
    pub fn request(
        &self,
        member: &Name,
        share: &mut Share,
        amount: u64,
        live: &BTreeSet<Name>,
    ) -> bool {
        if amount == 0 || self.open_request(member, share, live).is_some() {
            return false;
        }
        let richest = live
            .iter()
            .filter(|other| *other != member)
            .map(|other| (self.available(other), other))
            .filter(|(available, _)| *available > 0)
            .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)));
        let Some((_, to)) = richest else {
            return false;
        };
        let seq = share.request.as_ref().map_or(0, |request| request.seq) + 1;
        share.request = Some(Request {
            seq,
            to: to.clone(),
            amount,
        });
        true
    }

    /// Answers the open requests addressed to `member` by live members, smallest name first,
    /// granting from what it has available. A member with an open request of its own answers
    /// only members with smaller names (with a grant of 0 to the others, so they ask elsewhere):
    /// two needy members never trade rights back and forth. Returns the grants made.
    pub fn answer(
        &self,
        member: &Name,
        share: &mut Share,
        live: &BTreeSet<Name>,
    ) -> Vec<(Name, u64)> {
        let needy = self.open_request(member, share, live).is_some();
        let mut granted = Vec::new();
        for (asker, theirs) in &self.shares {
            let Some(request) = &theirs.request else {
                continue;
            };
            let answered = share.grants.get(asker).map_or(0, |grant| grant.answered);
            if asker == member
                || request.to != *member
                || request.seq <= answered
                || !live.contains(asker)
            {
                continue;
            }
            let amount = if needy && asker > member {
                0
            } else {
                self.spare(member, share).min(request.amount)
            };
            let grant = share.grants.entry(asker.clone()).or_default();
            grant.total = grant.total.saturating_add(amount);
            grant.answered = request.seq;
            granted.push((asker.clone(), amount));
        }
        granted
    }

    /// The write that publishes `share` as `member`'s.
    pub fn put(&self, member: &Name, share: &Share) -> Put {
        Put {
            key: keys::share(&self.spec.namespace, member),
            value: keys::encode(share),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str) -> Name {
        Name::new(name).expect("valid")
    }

    fn spec(limit: u64, holders: &[&str]) -> QuotaSpec {
        QuotaSpec {
            namespace: Name::new("team").expect("valid"),
            cpu_millis: limit,
            holders: holders.iter().map(|name| member(name)).collect(),
        }
    }

    fn live(names: &[&str]) -> BTreeSet<Name> {
        names.iter().map(|name| member(name)).collect()
    }

    /// The escrow after `member` published `share`.
    fn publish(escrow: &Escrow, name: &str, share: Share) -> Escrow {
        let mut shares = escrow.shares.clone();
        shares.insert(member(name), share);
        Escrow::new(escrow.spec.clone(), shares)
    }

    #[test]
    fn initial_rights_split_evenly_with_the_remainder_first() {
        let spec = spec(1_000, &["c", "a", "b", "a"]);
        let rights: Vec<u64> = ["a", "b", "c", "d"]
            .iter()
            .map(|name| spec.initial_rights(&member(name)))
            .collect();
        assert_eq!(rights, [334, 333, 333, 0]);
        assert!(
            QuotaSpec {
                holders: vec![],
                ..spec
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn consumption_stops_at_the_rights_held() {
        let escrow = Escrow::new(spec(1_000, &["a", "b"]), BTreeMap::new());
        let a = member("a");
        let mut share = escrow.share(&a);
        escrow.consume(&a, &mut share, 400).expect("within rights");
        let refused = escrow.consume(&a, &mut share, 101);
        assert!(matches!(
            refused,
            Err(SchedError::InsufficientRights {
                rights: 500,
                wanted: 501,
                ..
            })
        ));
        assert_eq!(share.consumed, 400, "a refusal changes nothing");
        escrow.release(&mut share, 300);
        assert_eq!(share.consumed, 100);
        // Lowering is always allowed, even below rights that shrank.
        escrow.set_consumed(&a, &mut share, 0).expect("lowering");
    }

    #[test]
    fn a_request_moves_rights_from_the_richest_live_member() {
        let everyone = live(&["a", "b", "c"]);
        let (a, b, c) = (member("a"), member("b"), member("c"));
        let mut escrow = Escrow::new(spec(1_000, &["a", "c"]), BTreeMap::new());
        let mut c_share = escrow.share(&c);
        escrow
            .consume(&c, &mut c_share, 300)
            .expect("within rights");
        escrow = publish(&escrow, "c", c_share);

        let mut b_share = escrow.share(&b);
        assert!(escrow.request(&b, &mut b_share, 400, &everyone));
        assert_eq!(b_share.request.as_ref().map(|r| r.to.as_str()), Some("a"));
        escrow = publish(&escrow, "b", b_share.clone());
        assert!(
            !escrow.request(&b, &mut b_share, 400, &everyone),
            "one open request at a time"
        );

        let mut a_share = escrow.share(&a);
        assert_eq!(
            escrow.answer(&a, &mut a_share, &everyone),
            [(b.clone(), 400)]
        );
        escrow = publish(&escrow, "a", a_share.clone());
        assert_eq!(
            escrow.answer(&a, &mut a_share, &everyone),
            [],
            "answered once"
        );
        assert_eq!(
            (escrow.rights(&a), escrow.rights(&b), escrow.rights(&c)),
            (100, 400, 500)
        );
        assert!(
            escrow
                .open_request(&b, &escrow.share(&b), &everyone)
                .is_none()
        );
        let mut b_share = escrow.share(&b);
        escrow
            .consume(&b, &mut b_share, 400)
            .expect("granted rights");
    }

    #[test]
    fn a_grant_never_exceeds_what_the_giver_has_spare() {
        let everyone = live(&["a", "b"]);
        let (a, b) = (member("a"), member("b"));
        let mut escrow = Escrow::new(spec(1_000, &["a"]), BTreeMap::new());
        let mut a_share = escrow.share(&a);
        escrow
            .consume(&a, &mut a_share, 900)
            .expect("within rights");
        escrow = publish(&escrow, "a", a_share);
        let mut b_share = escrow.share(&b);
        assert!(escrow.request(&b, &mut b_share, 500, &everyone));
        escrow = publish(&escrow, "b", b_share);
        let mut a_share = escrow.share(&a);
        assert_eq!(
            escrow.answer(&a, &mut a_share, &everyone),
            [(b.clone(), 100)]
        );
        escrow = publish(&escrow, "a", a_share);
        assert_eq!(escrow.total_consumed(), 900);
        assert_eq!(escrow.rights(&a) + escrow.rights(&b), 1_000);
        assert_eq!(escrow.available(&a), 0);
    }

    #[test]
    fn two_needy_members_do_not_trade_rights_back_and_forth() {
        let everyone = live(&["a", "b"]);
        let (a, b) = (member("a"), member("b"));
        let mut escrow = Escrow::new(spec(1_000, &["a", "b"]), BTreeMap::new());
        let mut a_share = escrow.share(&a);
        let mut b_share = escrow.share(&b);
        assert!(escrow.request(&a, &mut a_share, 300, &everyone));
        assert!(escrow.request(&b, &mut b_share, 300, &everyone));
        escrow = publish(&escrow, "a", a_share.clone());
        escrow = publish(&escrow, "b", b_share.clone());
        // The smaller name is served; the larger one is told no, so it asks elsewhere.
        assert_eq!(escrow.answer(&a, &mut a_share, &everyone), [(b.clone(), 0)]);
        assert_eq!(
            escrow.answer(&b, &mut b_share, &everyone),
            [(a.clone(), 300)]
        );
        escrow = publish(&escrow, "a", a_share);
        escrow = publish(&escrow, "b", b_share);
        assert_eq!((escrow.rights(&a), escrow.rights(&b)), (800, 200));
    }

    #[test]
    fn requests_go_to_live_members_only_and_dead_addressees_free_the_asker() {
        let (a, b) = (member("a"), member("b"));
        let escrow = Escrow::new(spec(1_000, &["a", "c"]), BTreeMap::new());
        let mut b_share = escrow.share(&b);
        assert!(escrow.request(&b, &mut b_share, 100, &live(&["a", "b", "c"])));
        assert_eq!(b_share.request.as_ref().map(|r| r.to.as_str()), Some("a"));
        // "a" died before answering: the request is no longer open, and the next goes to "c".
        let without_a = live(&["b", "c"]);
        assert!(escrow.open_request(&b, &b_share, &without_a).is_none());
        assert!(escrow.request(&b, &mut b_share, 100, &without_a));
        assert_eq!(
            b_share.request.as_ref().map(|r| (r.to.as_str(), r.seq)),
            Some(("c", 2))
        );
        assert!(!escrow.request(&a, &mut escrow.share(&a), 100, &live(&["a"])));
    }
}
