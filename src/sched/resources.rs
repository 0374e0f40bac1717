//! Amounts of machine resources: CPU, memory and named custom resources.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// An amount of each resource: what a machine offers, or what a task needs.
///
/// A custom resource absent from the map counts as zero.
///
/// ```
/// use mantissa::sched::{Resource, Resources};
/// let capacity = Resources::new(4_000, 8 << 30).with("gpu", 1);
/// let used = Resources::new(3_500, 1 << 30);
/// assert_eq!(capacity.shortfall(&used, &Resources::new(500, 0)), None);
/// assert_eq!(capacity.shortfall(&used, &Resources::new(501, 0)), Some(Resource::Cpu));
/// assert_eq!(
///     capacity.shortfall(&used, &Resources::new(0, 0).with("gpu", 2)),
///     Some(Resource::Custom("gpu".into()))
/// );
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Thousandths of a CPU core.
    #[serde(default)]
    pub cpu_millis: u64,
    /// Bytes of memory: a number, or in a spec also a size such as `"512MiB"` or `"8GiB"` (the
    /// agent's `--memory` takes the same), so a spec and the flags read alike.
    #[serde(default, deserialize_with = "bytes_or_size")]
    pub memory_bytes: u64,
    /// Named resources (GPUs, ports, licences), as whole units.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom: BTreeMap<String, u64>,
}

/// One kind of resource.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// CPU time.
    Cpu,
    /// Memory.
    Memory,
    /// A named custom resource.
    Custom(String),
}

impl Resources {
    /// `cpu_millis` and `memory_bytes`, and no custom resource.
    pub fn new(cpu_millis: u64, memory_bytes: u64) -> Self {
        Resources {
            cpu_millis,
            memory_bytes,
            custom: BTreeMap::new(),
        }
    }

    /// The same amounts plus `amount` units of the custom resource `name`.
    pub fn with(mut self, name: impl Into<String>, amount: u64) -> Self {
        self.custom.insert(name.into(), amount);
        self
    }

    /// The amount of the custom resource `name` (0 when absent).
    pub fn custom_amount(&self, name: &str) -> u64 {
        self.custom.get(name).copied().unwrap_or(0)
    }

    /// Adds `other`, saturating.
    pub fn add(&mut self, other: &Resources) {
        self.cpu_millis = self.cpu_millis.saturating_add(other.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_add(other.memory_bytes);
        for (name, amount) in &other.custom {
            let slot = self.custom.entry(name.clone()).or_insert(0);
            *slot = slot.saturating_add(*amount);
        }
    }

    /// The sum of `all`.
    pub fn total<'a>(all: impl IntoIterator<Item = &'a Resources>) -> Resources {
        let mut total = Resources::default();
        for resources in all {
            total.add(resources);
        }
        total
    }

    /// The first resource, in the order CPU, memory, custom by name, of which `used + demand`
    /// exceeds `self` (the capacity); `None` when the demand fits.
    pub fn shortfall(&self, used: &Resources, demand: &Resources) -> Option<Resource> {
        if used.cpu_millis.saturating_add(demand.cpu_millis) > self.cpu_millis {
            return Some(Resource::Cpu);
        }
        if used.memory_bytes.saturating_add(demand.memory_bytes) > self.memory_bytes {
            return Some(Resource::Memory);
        }
        demand
            .custom
            .iter()
            .find(|&(name, &amount)| {
                used.custom_amount(name).saturating_add(amount) > self.custom_amount(name)
            })
            .map(|(name, _)| Resource::Custom(name.clone()))
    }

    /// Whether `used` is within `self` (the capacity), resource by resource.
    pub fn holds(&self, used: &Resources) -> bool {
        self.shortfall(used, &Resources::default()).is_none()
    }

    /// How full `used` makes this capacity, in millionths per resource, summed over CPU and
    /// memory: a deterministic integer score for the placement strategies.
    #[cfg(test)]
    pub(crate) fn utilization_ppm(&self, used: &Resources) -> u64 {
        self.utilization_after_ppm(used, &Resources::default())
    }

    /// [`Resources::utilization_ppm`] of `used` plus `demand` (added as [`Resources::add`] does),
    /// without building the sum.
    pub(crate) fn utilization_after_ppm(&self, used: &Resources, demand: &Resources) -> u64 {
        let part = |used: u64, demand: u64, capacity: u64| -> u64 {
            if capacity == 0 {
                return 0;
            }
            let used = used.saturating_add(demand);
            let ppm = match used.checked_mul(1_000_000) {
                Some(scaled) => scaled / capacity,
                None => (u128::from(used) * 1_000_000 / u128::from(capacity))
                    .min(u128::from(u64::MAX)) as u64,
            };
            ppm.min(u64::MAX / 2)
        };
        part(used.cpu_millis, demand.cpu_millis, self.cpu_millis)
            + part(used.memory_bytes, demand.memory_bytes, self.memory_bytes)
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Cpu => f.write_str("cpu"),
            Resource::Memory => f.write_str("memory"),
            Resource::Custom(name) => f.write_str(name),
        }
    }
}

/// Parses `1234`, `512MiB`, `8GiB`, `16G`, `100k` (decimal and binary units, any case).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| "expected a size such as 8GiB, 512MiB or a number of bytes".to_owned())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?}; use B, KiB, MiB, GiB, TiB, K, M, G or T"
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| "too large".to_owned())
}

/// Reads a number of bytes, or a size string such as `"8GiB"` (see [`parse_size`]).
fn bytes_or_size<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = u64;

        fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
            formatter.write_str("a number of bytes or a size such as \"512MiB\" or \"8GiB\"")
        }

        fn visit_u64<E: serde::de::Error>(self, bytes: u64) -> Result<u64, E> {
            Ok(bytes)
        }

        fn visit_i64<E: serde::de::Error>(self, bytes: i64) -> Result<u64, E> {
            u64::try_from(bytes)
                .map_err(|_| E::custom(format!("a size cannot be negative: {bytes}")))
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<u64, E> {
            parse_size(text).map_err(|reason| E::custom(format!("size {text:?}: {reason}")))
        }
    }
    deserializer.deserialize_any(Visitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortfall_names_the_first_resource_that_does_not_fit() {
        let capacity = Resources::new(1_000, 1_000).with("gpu", 2).with("port", 1);
        let used = Resources::new(500, 900).with("gpu", 1);
        assert_eq!(capacity.shortfall(&used, &Resources::new(500, 100)), None);
        assert_eq!(
            capacity.shortfall(&used, &Resources::new(600, 200)),
            Some(Resource::Cpu)
        );
        assert_eq!(
            capacity.shortfall(&used, &Resources::new(100, 200)),
            Some(Resource::Memory)
        );
        let gpus = Resources::new(0, 0).with("gpu", 2).with("port", 2);
        assert_eq!(
            capacity.shortfall(&used, &gpus),
            Some(Resource::Custom("gpu".into()))
        );
        let unknown = Resources::new(0, 0).with("fpga", 1);
        assert_eq!(
            capacity.shortfall(&used, &unknown),
            Some(Resource::Custom("fpga".into()))
        );
        // Asking for zero of a resource the machine lacks is no demand at all.
        assert_eq!(
            capacity.shortfall(&used, &Resources::new(0, 0).with("fpga", 0)),
            None
        );
    }

    #[test]
    fn sums_saturate_instead_of_wrapping() {
        let mut total = Resources::new(u64::MAX, 1).with("gpu", u64::MAX);
        total.add(&Resources::new(1, 1).with("gpu", 1));
        assert_eq!(total, Resources::new(u64::MAX, 2).with("gpu", u64::MAX));
        let capacity = Resources::new(10, 10);
        assert_eq!(
            capacity.shortfall(&Resources::new(u64::MAX, 0), &Resources::new(1, 0)),
            Some(Resource::Cpu)
        );
    }

    #[test]
    fn utilization_is_an_integer_score() {
        let capacity = Resources::new(1_000, 4_000);
        assert_eq!(
            capacity.utilization_ppm(&Resources::new(500, 1_000)),
            750_000
        );
        assert_eq!(
            Resources::default().utilization_ppm(&Resources::new(5, 5)),
            0
        );
    }
}
