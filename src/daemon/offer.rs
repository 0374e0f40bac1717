//! The agent's scheduling settings: whether it runs the reference scheduler, and what this
//! machine offers to run tasks (its capacity, labels and custom resources).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::daemon::config::{ConfigError, FileConfig};
use crate::gossip::MemberName;
pub use crate::sched::parse_size;
use crate::sched::{NodeRecord, Resources};

/// The agent's scheduling flags.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct SchedulingFlags {
    /// Runs the reference scheduler on this agent: it claims machines for pending tasks, racing
    /// the other schedulers without a leader (see docs/scheduling.md). Also offers this machine,
    /// unless --no-offer.
    #[arg(long, env = "MANTISSA_SCHEDULER")]
    pub scheduler: bool,

    /// Offers this machine to run tasks: registers its capacity and admits or rejects the
    /// claims made on it. Implied by --scheduler.
    #[arg(long, env = "MANTISSA_OFFER", conflicts_with = "no_offer")]
    pub offer: bool,

    /// With --scheduler: places tasks on other machines only.
    #[arg(long, env = "MANTISSA_NO_OFFER")]
    pub no_offer: bool,

    /// The CPU this machine offers, in millis (1000 = one core) [default: the cores this
    /// process may use, times 1000].
    #[arg(long, env = "MANTISSA_CPU_MILLIS", value_name = "MILLIS")]
    pub cpu_millis: Option<u64>,

    /// The memory this machine offers: bytes, or a size such as 512MiB, 8GiB, 16G [default: the
    /// machine's memory, or its cgroup limit if lower].
    #[arg(long, env = "MANTISSA_MEMORY", value_name = "SIZE")]
    pub memory: Option<String>,

    /// A label task groups can require, KEY=VALUE, e.g. zone=eu-1 (repeatable; the variable
    /// takes a comma-separated list).
    #[arg(
        long = "label",
        env = "MANTISSA_LABEL",
        value_name = "KEY=VALUE",
        value_delimiter = ','
    )]
    pub labels: Vec<String>,

    /// A custom resource this machine offers, NAME=AMOUNT, e.g. gpu=2 (repeatable; the variable
    /// takes a comma-separated list).
    #[arg(
        long = "resource",
        env = "MANTISSA_RESOURCE",
        value_name = "NAME=AMOUNT",
        value_delimiter = ','
    )]
    pub resources: Vec<String>,
}

/// A size in the config file: `8589934592` or `"8GiB"`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Size {
    /// Bytes.
    Bytes(u64),
    /// A size string, parsed like the flag.
    Text(String),
}

/// What the agent does for scheduling, once flags and file are merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulingSettings {
    /// Run the reference scheduler.
    pub plan: bool,
    /// Offer this machine; `None`: it runs no tasks.
    pub offer: Option<OfferSettings>,
}

/// What this machine offers; capacity left `None` is detected when the agent starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OfferSettings {
    /// CPU millis, or detect.
    pub cpu_millis: Option<u64>,
    /// Memory bytes, or detect.
    pub memory_bytes: Option<u64>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Custom resources.
    pub resources: BTreeMap<String, u64>,
}

impl SchedulingSettings {
    /// Merges the flags over the config file's fields and checks them.
    pub fn resolve(
        flags: SchedulingFlags,
        file: &FileConfig,
    ) -> Result<SchedulingSettings, ConfigError> {
        let fields = file;
        let in_file = |name: &str| format!("{name} (in {})", file.path.display());
        let plan = flags.scheduler || fields.scheduler.unwrap_or(false);
        let offer = if flags.no_offer {
            false
        } else {
            flags.offer || fields.offer.unwrap_or(plan)
        };
        let mut settings = OfferSettings {
            cpu_millis: flags.cpu_millis.or(fields.cpu_millis),
            ..OfferSettings::default()
        };
        settings.memory_bytes = match (&flags.memory, &fields.memory) {
            (Some(text), _) => {
                Some(parse_size(text).map_err(|reason| invalid("--memory", text, reason))?)
            }
            (None, Some(Size::Bytes(bytes))) => Some(*bytes),
            (None, Some(Size::Text(text))) => {
                Some(parse_size(text).map_err(|reason| invalid(&in_file("memory"), text, reason))?)
            }
            (None, None) => None,
        };
        if settings.cpu_millis == Some(0) || settings.memory_bytes == Some(0) {
            return Err(ConfigError::Conflict(
                "a machine that offers itself needs some CPU and memory: --cpu-millis and \
                 --memory must be at least 1"
                    .to_owned(),
            ));
        }
        settings.labels = fields.labels.clone().unwrap_or_default();
        for label in &flags.labels {
            let (key, value) =
                split_pair(label).map_err(|reason| invalid("--label", label, reason))?;
            settings.labels.insert(key.to_owned(), value.to_owned());
        }
        if let Some(key) = settings.labels.keys().find(|key| key.is_empty()) {
            return Err(invalid(&in_file("labels"), key, "a label needs a name"));
        }
        settings.resources = fields.resources.clone().unwrap_or_default();
        for resource in &flags.resources {
            let (name, amount) =
                split_pair(resource).map_err(|reason| invalid("--resource", resource, reason))?;
            let amount: u64 = amount.parse().map_err(|_| {
                invalid(
                    "--resource",
                    resource,
                    "the amount must be a whole number, e.g. gpu=2",
                )
            })?;
            settings.resources.insert(name.to_owned(), amount);
        }
        let offering_details = flags.cpu_millis.is_some()
            || flags.memory.is_some()
            || !flags.labels.is_empty()
            || !flags.resources.is_empty();
        if !offer && offering_details {
            return Err(ConfigError::Conflict(
                "--cpu-millis, --memory, --label and --resource describe what this machine \
                 offers: add --offer (or --scheduler, which offers it too)"
                    .to_owned(),
            ));
        }
        Ok(SchedulingSettings {
            plan,
            offer: offer.then_some(settings),
        })
    }
}

impl OfferSettings {
    /// The capacity offered, detecting what was left unset.
    pub fn capacity(&self) -> Result<Resources, String> {
        let cpu_millis = match self.cpu_millis {
            Some(millis) => millis,
            None => {
                let cores = std::thread::available_parallelism().map_err(|err| {
                    format!("cannot count this machine's cores ({err}); set --cpu-millis")
                })?;
                cores.get() as u64 * 1000
            }
        };
        let memory_bytes = match self.memory_bytes {
            Some(bytes) => bytes,
            None => {
                detect_memory().ok_or("cannot read this machine's memory size; set --memory")?
            }
        };
        let mut capacity = Resources::new(cpu_millis, memory_bytes);
        for (name, amount) in &self.resources {
            capacity = capacity.with(name.clone(), *amount);
        }
        Ok(capacity)
    }

    /// The record of machine `name` offering `capacity` with these labels.
    pub fn record(&self, name: MemberName, capacity: Resources) -> NodeRecord {
        let mut record = NodeRecord::new(name, capacity);
        record.labels = self.labels.clone();
        record
    }
}

fn split_pair(text: &str) -> Result<(&str, &str), &'static str> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key, value)),
        _ => Err("expected NAME=VALUE"),
    }
}

pub(crate) fn invalid(setting: &str, value: &str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        setting: format!("{setting} {value:?}"),
        reason: reason.to_string(),
    }
}

/// The machine's memory, or its cgroup (v2) limit when that is lower.
fn detect_memory() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total(&text));
    let limit = cgroup_limit(Path::new("/sys/fs/cgroup/memory.max"));
    match (total, limit) {
        (Some(total), Some(limit)) => Some(total.min(limit)),
        (total, limit) => total.or(limit),
    }
}

/// `MemTotal` from /proc/meminfo, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn cgroup_limit(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(flags: SchedulingFlags, file: &str) -> Result<SchedulingSettings, ConfigError> {
        let file = FileConfig::parse(Path::new("/etc/mantissa.toml"), file).expect("parses");
        SchedulingSettings::resolve(flags, &file)
    }

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        assert_eq!(parse_size("1234"), Ok(1234));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("8gib"), Ok(8 << 30));
        assert_eq!(parse_size("16G"), Ok(16_000_000_000));
        assert!(
            parse_size("8 bananas")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_size("GiB").is_err());
        assert_eq!(parse_size("99999999999TiB"), Err("too large".to_owned()));
    }

    #[test]
    fn scheduler_offers_the_machine_unless_told_not_to() {
        let flags = SchedulingFlags {
            scheduler: true,
            ..SchedulingFlags::default()
        };
        let settings = resolve(flags.clone(), "").expect("valid");
        assert!(settings.plan && settings.offer.is_some());
        let settings = resolve(
            SchedulingFlags {
                no_offer: true,
                ..flags
            },
            "",
        )
        .expect("valid");
        assert!(settings.plan && settings.offer.is_none());
        assert_eq!(
            resolve(SchedulingFlags::default(), "").expect("valid"),
            SchedulingSettings::default()
        );
    }

    #[test]
    fn flags_override_the_file_and_add_labels() {
        let flags = SchedulingFlags {
            offer: true,
            memory: Some("2GiB".into()),
            labels: vec!["zone=eu-2".into(), "rack=r1".into()],
            resources: vec!["gpu=2".into()],
            ..SchedulingFlags::default()
        };
        let file =
            "cpu_millis = 8000\nmemory = \"1GiB\"\nlabels = { zone = \"eu-1\", disk = \"ssd\" }\n";
        let offer = resolve(flags, file).expect("valid").offer.expect("offers");
        assert_eq!(offer.cpu_millis, Some(8000));
        assert_eq!(offer.memory_bytes, Some(2 << 30));
        assert_eq!(offer.labels["zone"], "eu-2");
        assert_eq!(offer.labels["disk"], "ssd");
        assert_eq!(offer.resources["gpu"], 2);
        let capacity = offer.capacity().expect("complete");
        let record = offer.record(MemberName::new("n1").expect("valid"), capacity);
        assert_eq!(record.capacity.cpu_millis, 8000);
        assert_eq!(record.capacity.custom["gpu"], 2);
    }

    #[test]
    fn bad_scheduling_settings_name_the_flag() {
        let bad_label = SchedulingFlags {
            offer: true,
            labels: vec!["zone".into()],
            ..SchedulingFlags::default()
        };
        let err = resolve(bad_label, "").unwrap_err().to_string();
        assert!(
            err.contains("--label \"zone\"") && err.contains("NAME=VALUE"),
            "{err}"
        );
        let bad_amount = SchedulingFlags {
            offer: true,
            resources: vec!["gpu=two".into()],
            ..SchedulingFlags::default()
        };
        let err = resolve(bad_amount, "").unwrap_err().to_string();
        assert!(
            err.contains("--resource") && err.contains("whole number"),
            "{err}"
        );
        let no_offer = SchedulingFlags {
            cpu_millis: Some(1000),
            ..SchedulingFlags::default()
        };
        let err = resolve(no_offer, "").unwrap_err().to_string();
        assert!(err.contains("--offer"), "{err}");
        let err = resolve(
            SchedulingFlags::default(),
            "offer = true\nmemory = \"lots\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("memory (in /etc/mantissa.toml)"), "{err}");
    }

    #[test]
    fn memory_is_read_from_meminfo() {
        let meminfo = "MemTotal:       16318856 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total(meminfo), Some(16318856 * 1024));
        assert_eq!(mem_total("nothing"), None);
        // Detection works on the machines the tests run on.
        assert!(detect_memory().is_some_and(|bytes| bytes > 0));
    }
}
