//! `mantissa tls init` and `mantissa tls issue`: a cluster CA and node certificates on disk.
//!
//! Private keys are created with mode 0600 from the start (never written, then restricted), and
//! no existing file is replaced without `--force`; with it, the new file is written beside the
//! old one and renamed over it, so a reader never sees half a file.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mantissa::daemon::config::io_reason;
use mantissa::runtime::{ClusterCa, TlsError, validate_node_name};

use crate::commands::{Failure, emit_line};

/// Mode of private key files: readable by their owner only.
const KEY_MODE: u32 = 0o600;
/// Mode of certificate files: public.
const CERT_MODE: u32 = 0o644;
/// Mode of a directory created for the files: it holds the CA key.
const DIR_MODE: u32 = 0o700;
/// The CA certificate's file name.
const CA_CERT: &str = "ca.pem";
/// The CA key's file name.
const CA_KEY: &str = "ca-key.pem";

/// One file to write.
struct Output {
    path: PathBuf,
    contents: String,
    mode: u32,
}

/// Creates a cluster CA in `dir`: `ca.pem` and `ca-key.pem`.
pub fn init(dir: &Path, cluster: &str, force: bool) -> Result<(), Failure> {
    let ca =
        ClusterCa::generate(cluster).map_err(|err| Failure::usage(format!("--name: {err}")))?;
    let outputs = [
        Output {
            path: dir.join(CA_CERT),
            contents: ca.cert_pem().to_owned(),
            mode: CERT_MODE,
        },
        Output {
            path: dir.join(CA_KEY),
            contents: ca.key_pem().to_owned(),
            mode: KEY_MODE,
        },
    ];
    write_all(
        dir,
        &outputs,
        force,
        "replacing the CA invalidates every certificate it issued",
    )?;
    let [cert, key] = &outputs;
    emit_line(&format!(
        "wrote {} (the cluster CA certificate: every node needs it)",
        cert.path.display()
    ));
    emit_line(&format!(
        "wrote {} (the CA private key, mode 0600: keep it safe, and off the nodes if you can)",
        key.path.display()
    ));
    emit_line(&format!(
        "next: mantissa tls issue --dir {} --node <name>",
        shell_word(dir)
    ));
    Ok(())
}

/// Issues a certificate and key for node `node`, signed by the CA in `dir`.
pub fn issue(dir: &Path, node: &str, days: u32, force: bool) -> Result<(), Failure> {
    validate_node_name(node).map_err(|err| Failure::usage(format!("--node: {err}")))?;
    if node == "ca" || node == "ca-key" {
        return Err(Failure::usage(format!(
            "--node {node:?}: the name is reserved, its files would collide with the CA's"
        )));
    }
    let ca = load_ca(dir)?;
    let validity = Duration::from_secs(u64::from(days) * 24 * 3600);
    let credentials = ca
        .issue(node, validity)
        .map_err(|err| Failure::failed(format!("issuing the certificate: {err}")))?;
    let cert_path = dir.join(format!("{node}.pem"));
    let key_path = dir.join(format!("{node}-key.pem"));
    let outputs = [
        Output {
            path: cert_path.clone(),
            contents: credentials.cert_pem,
            mode: CERT_MODE,
        },
        Output {
            path: key_path.clone(),
            contents: credentials.key_pem,
            mode: KEY_MODE,
        },
    ];
    write_all(
        dir,
        &outputs,
        force,
        "the node must then be restarted with the new files",
    )?;
    emit_line(&format!(
        "wrote {} (certificate for node {node:?}, valid {days} days, for both server and client \
         authentication)",
        cert_path.display()
    ));
    emit_line(&format!(
        "wrote {} (its private key, mode 0600)",
        key_path.display()
    ));
    emit_line(&format!(
        "run the node with:\n  mantissa agent --node-id {node} --tls-ca {} --tls-cert {} \
         --tls-key {} --data-dir <dir> [--join <host:port>]",
        shell_word(&dir.join(CA_CERT)),
        shell_word(&cert_path),
        shell_word(&key_path)
    ));
    Ok(())
}

/// Loads the CA written by `init` in `dir`.
fn load_ca(dir: &Path) -> Result<ClusterCa, Failure> {
    let read = |name: &str| {
        let path = dir.join(name);
        fs::read_to_string(&path).map_err(|err| {
            let hint = if err.kind() == io::ErrorKind::NotFound {
                format!(
                    " (create the CA first: mantissa tls init --dir {})",
                    shell_word(dir)
                )
            } else {
                String::new()
            };
            Failure::failed(format!("{}: {}{hint}", path.display(), io_reason(&err)))
        })
    };
    let cert = read(CA_CERT)?;
    let key = read(CA_KEY)?;
    ClusterCa::from_pem(&cert, &key).map_err(|err| {
        let message = match err {
            TlsError::CaKeyMismatch => format!(
                "{}: does not match the CA certificate {}",
                dir.join(CA_KEY).display(),
                dir.join(CA_CERT).display()
            ),
            TlsError::BadInput { what, reason } if what.contains("key") => {
                format!("{}: {reason}", dir.join(CA_KEY).display())
            }
            TlsError::BadInput { reason, .. } => {
                format!("{}: {reason}", dir.join(CA_CERT).display())
            }
            other => format!("loading the CA from {}: {other}", dir.display()),
        };
        Failure::failed(message)
    })
}

/// Creates `dir` if needed, refuses (without `force`) if any output exists, then writes them.
fn write_all(
    dir: &Path,
    outputs: &[Output],
    force: bool,
    why_careful: &str,
) -> Result<(), Failure> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|err| Failure::failed(format!("{}: {}", dir.display(), io_reason(&err))))?;
    if !force && let Some(existing) = outputs.iter().find(|output| output.path.exists()) {
        return Err(Failure::failed(format!(
            "{} already exists; nothing was written. Use --force to replace it ({why_careful})",
            existing.path.display()
        )));
    }
    for output in outputs {
        write_file(&output.path, output.contents.as_bytes(), output.mode, force).map_err(
            |err| Failure::failed(format!("{}: {}", output.path.display(), io_reason(&err))),
        )?;
    }
    Ok(())
}

/// Writes a new file created with `mode`. Without `replace`, an existing file is an error;
/// with it, the contents go to a fresh file renamed over the old one, which therefore gets `mode`
/// too.
fn write_file(path: &Path, contents: &[u8], mode: u32, replace: bool) -> io::Result<()> {
    if !replace {
        return create_new(path, contents, mode);
    }
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
    let mut temporary = name.to_os_string();
    temporary.push(format!(".tmp-{}", std::process::id()));
    let temporary = path.with_file_name(temporary);
    let _ = fs::remove_file(&temporary);
    create_new(&temporary, contents, mode)?;
    fs::rename(&temporary, path).inspect_err(|_| {
        let _ = fs::remove_file(&temporary);
    })
}

fn create_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// A path as a shell word: quoted when it holds anything but plain characters.
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:=@,".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn temp_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mantissa-tls-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_then_issue_writes_keys_0600_and_refuses_to_overwrite() {
        let dir = temp_dir("flow").join("nested");
        init(&dir, "test", false).unwrap();
        assert_eq!(mode(&dir.join("ca-key.pem")), KEY_MODE);
        assert_eq!(mode(&dir.join("ca.pem")) & 0o600, 0o600);
        let ca_before = fs::read_to_string(dir.join("ca.pem")).unwrap();

        let err = init(&dir, "test", false).unwrap_err();
        assert!(
            err.message.contains("ca.pem already exists"),
            "{}",
            err.message
        );
        assert_eq!(fs::read_to_string(dir.join("ca.pem")).unwrap(), ca_before);

        issue(&dir, "n1", 30, false).unwrap();
        assert_eq!(mode(&dir.join("n1-key.pem")), KEY_MODE);
        let err = issue(&dir, "n1", 30, false).unwrap_err();
        assert!(
            err.message.contains("n1.pem already exists"),
            "{}",
            err.message
        );

        // Replacing keeps 0600 even when the old file had looser permissions.
        fs::set_permissions(dir.join("n1-key.pem"), fs::Permissions::from_mode(0o644)).unwrap();
        issue(&dir, "n1", 30, true).unwrap();
        assert_eq!(mode(&dir.join("n1-key.pem")), KEY_MODE);

        // The issued files form a valid identity under the CA.
        let tls = mantissa::runtime::TlsConfig::new(
            &ca_before,
            &mantissa::runtime::NodeCredentials {
                cert_pem: fs::read_to_string(dir.join("n1.pem")).unwrap(),
                key_pem: fs::read_to_string(dir.join("n1-key.pem")).unwrap(),
            },
        )
        .unwrap();
        assert_eq!(tls.node_name(), "n1");
        let _ = fs::remove_dir_all(dir.parent().unwrap());
    }

    #[test]
    fn issue_needs_a_ca_and_a_valid_name() {
        let dir = temp_dir("no-ca");
        let err = issue(&dir, "n1", 30, false).unwrap_err();
        let expected = format!(
            "ca.pem: no such file (create the CA first: mantissa tls init --dir {})",
            dir.display()
        );
        assert!(err.message.ends_with(&expected), "{}", err.message);
        let err = issue(&dir, "Bad_Name", 30, false).unwrap_err();
        assert!(
            err.message.starts_with("--node: invalid node name"),
            "{}",
            err.message
        );
        let err = issue(&dir, "ca", 30, false).unwrap_err();
        assert!(err.message.contains("reserved"), "{}", err.message);
    }

    #[test]
    fn shell_words_are_quoted_when_needed() {
        assert_eq!(
            shell_word(Path::new("/etc/mantissa/ca.pem")),
            "/etc/mantissa/ca.pem"
        );
        assert_eq!(
            shell_word(Path::new("my certs/ca.pem")),
            "'my certs/ca.pem'"
        );
        assert_eq!(shell_word(Path::new("it's")), r"'it'\''s'");
    }
}
