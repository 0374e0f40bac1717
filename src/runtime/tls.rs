//! Cluster certificate authority, node certificates and the TLS configurations built from them.
//!
//! Every node holds a certificate signed by the cluster CA. It is valid for both server and
//! client authentication and carries the node's name as its DNS subject alternative name, so
//! either side of a connection learns the other's name from the handshake alone. Names that
//! peers merely claim in messages are never trusted.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, VerifierBuilderError, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use x509_parser::extensions::GeneralName;

/// ALPN protocol identifier: refuses peers that speak anything but mantissa's protocol.
pub(crate) const ALPN: &[u8] = b"mantissa/1";

/// HKDF salt and info of the stateless-reset key: changing them changes every node's key, so a
/// node restarted across that change cannot reset its peers' old connections.
const RESET_KEY_SALT: &[u8] = b"mantissa stateless reset";
const RESET_KEY_INFO: &[u8] = b"quic stateless reset key v1";

/// Server name sent in the TLS handshake when dialing a seed whose node name is unknown.
///
/// Only informational: which name is required is decided by the dial's own verifier.
pub(crate) const SEED_SERVER_NAME: &str = "mantissa-seed";

/// Longest accepted node name (one DNS label's worth).
const MAX_NODE_NAME_LEN: usize = 63;

/// Lifetime of a generated cluster CA.
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);

/// Backdating of `not_before`, so that peers whose clocks lag slightly accept fresh certificates.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Errors from building certificates or TLS configurations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A node name that cannot be used as a certificate identity.
    #[error(
        "invalid node name {name:?}: {reason} (expected 1-63 chars of a-z, 0-9, '-', '.', starting with a letter or digit)"
    )]
    InvalidNodeName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A PEM input or certificate that could not be used; `what` names the input.
    #[error("{what}: {reason}")]
    BadInput {
        /// Which input failed, e.g. "CA certificate" or "node key".
        what: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// The CA private key does not belong to the CA certificate.
    #[error("CA key: does not match the CA certificate's public key")]
    CaKeyMismatch,
    /// A requested validity period that cannot be encoded.
    #[error("invalid certificate validity: {0}")]
    InvalidValidity(&'static str),
    /// rcgen failed to generate a key or certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls rejected the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client certificate verifier could not be built from the CA.
    #[error("TLS configuration: client verifier: {0}")]
    Verifier(#[from] VerifierBuilderError),
    /// The crypto provider lacks the cipher suite QUIC needs for its initial packets.
    #[error("TLS configuration: {0}")]
    Quic(#[from] NoInitialCipherSuite),
}

/// Checks that `name` is usable as a node name and as a DNS name in a certificate.
pub fn validate_node_name(name: &str) -> Result<(), TlsError> {
    let invalid = |reason| {
        Err(TlsError::InvalidNodeName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_NODE_NAME_LEN {
        return invalid("length out of range");
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if !name.chars().all(allowed) {
        return invalid("contains a character other than a-z, 0-9, '-', '.'");
    }
    // Every label must be a valid DNS label, or rustls could not match the name.
    let bad_label = |l: &str| l.is_empty() || l.starts_with('-') || l.ends_with('-');
    if name.split('.').any(bad_label) {
        return invalid("has an empty label or a label starting or ending with '-'");
    }
    // An IP-address-looking name would become an IP SAN, not a DNS name.
    if name.parse::<std::net::IpAddr>().is_ok() || DnsName::try_from(name).is_err() {
        return invalid("is not a DNS name");
    }
    Ok(())
}

/// The cluster certificate authority: signs node certificates.
pub struct ClusterCa {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The private key must never end up in logs.
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Generates a new self-signed CA (ECDSA P-256) for the cluster `cluster_name`.
    pub fn generate(cluster_name: &str) -> Result<ClusterCa, TlsError> {
        if cluster_name.is_empty() || cluster_name.len() > 64 {
            return Err(TlsError::BadInput {
                what: "cluster name",
                reason: "must be 1 to 64 bytes".to_owned(),
            });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("mantissa cluster CA {cluster_name}"),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "mantissa");
        // Path length 0: the CA signs node certificates only, never sub-CAs.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        set_validity(&mut params, backdate(now)?, later(now, CA_VALIDITY)?)?;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its PEM certificate and PEM (PKCS#8) private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, TlsError> {
        let cert_der = parse_cert_chain(cert_pem, "CA certificate")?
            .into_iter()
            .next()
            .ok_or_else(|| bad("CA certificate", "no PEM certificate found"))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| bad("CA key", e))?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|e| bad("CA certificate", e))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(TlsError::CaKeyMismatch);
        }
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| bad("CA certificate", e))?;
        Ok(ClusterCa {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate in PEM form: every node needs it to verify its peers.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key in PEM form: keep it off the nodes when possible.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a certificate for `node_name`, valid from now (minus clock skew) for `validity`.
    pub fn issue(&self, node_name: &str, validity: Duration) -> Result<NodeCredentials, TlsError> {
        let now = SystemTime::now();
        self.issue_between(node_name, backdate(now)?, later(now, validity)?)
    }

    /// Issues a certificate for `node_name` valid from `not_before` to `not_after`.
    pub fn issue_between(
        &self,
        node_name: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<NodeCredentials, TlsError> {
        validate_node_name(node_name)?;
        if not_after <= not_before {
            return Err(TlsError::InvalidValidity(
                "not_after must be after not_before",
            ));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, node_name);
        params.subject_alt_names = vec![SanType::DnsName(node_name.try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Every node is both a server (accepts) and a client (dials).
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, not_before, not_after)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(NodeCredentials {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A node's certificate and private key, both PEM.
#[derive(Clone)]
pub struct NodeCredentials {
    /// The node certificate (optionally followed by intermediates), PEM.
    pub cert_pem: String,
    /// The node's PKCS#8 private key, PEM.
    pub key_pem: String,
}

impl fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCredentials")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A node's TLS identity and trust: builds the QUIC server and per-dial client configurations.
#[derive(Clone)]
pub struct TlsConfig {
    inner: Arc<TlsInner>,
}

struct TlsInner {
    node_name: String,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    server: Arc<QuicServerConfig>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("node_name", &self.inner.node_name)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Parses the CA certificate and the node's credentials and builds the TLS configurations.
    ///
    /// The node's name is read from its own certificate. Whether that certificate is signed by
    /// the CA is not checked here: peers refuse it at handshake time.
    pub fn new(ca_cert_pem: &str, node: &NodeCredentials) -> Result<TlsConfig, TlsError> {
        let ca_certs = parse_cert_chain(ca_cert_pem, "CA certificate")?;
        let chain = parse_cert_chain(&node.cert_pem, "node certificate")?;
        let key = PrivateKeyDer::from_pem_slice(node.key_pem.as_bytes())
            .map_err(|e| bad("node key", pem_reason(e, "private key")))?;
        let node_name = node_name_from_cert(&chain[0]).map_err(|e| bad("node certificate", e))?;
        let mut roots = RootCertStore::empty();
        for cert in ca_certs {
            roots.add(cert).map_err(|e| bad("CA certificate", e))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(roots);
        let server = server_crypto(&provider, &roots, &chain, &key).map_err(|e| match e {
            TlsError::Rustls(rustls::Error::InconsistentKeys(_)) => {
                bad("node key", "does not match the node certificate")
            }
            other => other,
        })?;
        Ok(TlsConfig {
            inner: Arc::new(TlsInner {
                node_name,
                provider,
                roots,
                chain,
                key,
                server,
            }),
        })
    }

    /// This node's name, as written in its certificate.
    pub fn node_name(&self) -> &str {
        &self.inner.node_name
    }

    /// The QUIC stateless-reset key, derived from the node's private key.
    ///
    /// Every start of a node with the same credentials gets the same key, so a restarted process
    /// can answer its peers' packets on connections to its dead predecessor with a stateless
    /// reset they accept (RFC 9000 §10.3: the token of a connection id is `HMAC(key, id)`), and
    /// they drop those connections at once instead of after the idle timeout. Only a holder of
    /// the private key can compute tokens: HKDF makes the key pseudorandom and separate from any
    /// other use of the private key, and a peer learns only the tokens of its own connections.
    pub(crate) fn stateless_reset_key(&self) -> Arc<dyn quinn::crypto::HmacKey> {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, RESET_KEY_SALT);
        let prk = salt.extract(self.inner.key.secret_der());
        let okm = prk
            .expand(&[RESET_KEY_INFO], ring::hmac::HMAC_SHA256)
            .expect("32 bytes is within HKDF-SHA256's output limit");
        Arc::new(ring::hmac::Key::from(okm))
    }

    /// The QUIC server crypto: requires a client certificate signed by the CA.
    pub(crate) fn server_crypto(&self) -> Arc<QuicServerConfig> {
        self.inner.server.clone()
    }

    /// Client crypto for one dial: requires the server to be `expected` when given.
    ///
    /// Built per dial so that a name mismatch can be reported with the name actually presented.
    pub(crate) fn client_crypto(
        &self,
        expected: Option<&str>,
    ) -> Result<(Arc<QuicClientConfig>, MismatchSlot), TlsError> {
        let expected = match expected {
            Some(name) => {
                validate_node_name(name)?;
                Some(ServerName::try_from(name.to_owned()).map_err(|e| bad("expected name", e))?)
            }
            None => None,
        };
        let slot = MismatchSlot::default();
        let verifier = PeerVerifier {
            roots: self.inner.roots.clone(),
            algs: self.inner.provider.signature_verification_algorithms,
            expected,
            mismatch: slot.clone(),
        };
        let mut config = rustls::ClientConfig::builder_with_provider(self.inner.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.inner.chain.clone(), self.inner.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok((Arc::new(QuicClientConfig::try_from(config)?), slot))
    }
}

/// Records the name a server presented when it did not match the expected one.
#[derive(Clone, Default, Debug)]
pub(crate) struct MismatchSlot(Arc<Mutex<Option<String>>>);

impl MismatchSlot {
    fn set(&self, presented: String) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(presented);
    }

    /// The presented name, if the dial failed on a name mismatch.
    pub(crate) fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// Extracts the node name (the first DNS subject alternative name) from a DER certificate.
///
/// Only meaningful for a certificate the handshake has already verified against the CA.
pub(crate) fn node_name_from_cert(der: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad("certificate", e))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad("certificate", e))?
        .ok_or_else(|| bad("certificate", "has no subject alternative name"))?;
    let name = san
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::DNSName(name) => Some(*name),
            _ => None,
        })
        .ok_or_else(|| bad("certificate", "has no DNS name"))?;
    validate_node_name(name)?;
    Ok(name.to_owned())
}

/// Verifies a server certificate against the cluster CA, and its name when one is expected.
///
/// rustls' `WebPkiServerVerifier` always matches the server name, which a seed dial cannot know;
/// so this calls the same webpki chain validation (trust anchor, validity dates, serverAuth EKU)
/// and adds the name check only when a name is expected.
#[derive(Debug)]
struct PeerVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    expected: Option<ServerName<'static>>,
    mismatch: MismatchSlot,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        if let Some(expected) = &self.expected
            && let Err(e) = verify_server_name(&cert, expected)
        {
            let presented = node_name_from_cert(end_entity).unwrap_or_else(|e| e.to_string());
            self.mismatch.set(presented);
            return Err(e);
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Builds the server side: TLS 1.3 only, client certificate required and verified by the CA.
fn server_crypto(
    provider: &Arc<CryptoProvider>,
    roots: &Arc<RootCertStore>,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<Arc<QuicServerConfig>, TlsError> {
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.to_vec(), key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: every connection presents and verifies a full client certificate.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(QuicServerConfig::try_from(config)?))
}

/// Parses every certificate in a PEM string; an input without any is an error.
fn parse_cert_chain(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(what, pem_reason(e, "certificate")))?;
    if certs.is_empty() {
        return Err(bad(what, "no PEM certificate found"));
    }
    Ok(certs)
}

/// Words a PEM parse error, saying plainly when nothing of the right kind was present.
fn pem_reason(e: rustls::pki_types::pem::Error, kind: &str) -> String {
    match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!("no PEM {kind} found"),
        other => format!("invalid PEM: {other:?}"),
    }
}

/// Shorthand for a [`TlsError::BadInput`].
fn bad(what: &'static str, reason: impl fmt::Display) -> TlsError {
    TlsError::BadInput {
        what,
        reason: reason.to_string(),
    }
}

/// `now` minus the tolerated clock skew.
fn backdate(now: SystemTime) -> Result<SystemTime, TlsError> {
    now.checked_sub(CLOCK_SKEW)
        .ok_or(TlsError::InvalidValidity("clock before the epoch"))
}

/// `now` plus `validity`.
fn later(now: SystemTime, validity: Duration) -> Result<SystemTime, TlsError> {
    now.checked_add(validity)
        .ok_or(TlsError::InvalidValidity("validity too long"))
}

/// Writes the validity window into `params`.
fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), TlsError> {
    params.not_before = to_datetime(not_before)?;
    params.not_after = to_datetime(not_after)?;
    Ok(())
}

/// Converts to the date type rcgen uses, refusing dates X.509 cannot encode.
fn to_datetime(t: SystemTime) -> Result<time::OffsetDateTime, TlsError> {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => {
            i64::try_from(d.as_secs()).map_err(|_| TlsError::InvalidValidity("date too late"))?
        }
        Err(_) => return Err(TlsError::InvalidValidity("date before 1970")),
    };
    let dt = time::OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|_| TlsError::InvalidValidity("date out of range"))?;
    if dt.year() > 9999 {
        return Err(TlsError::InvalidValidity("date after year 9999"));
    }
    Ok(dt)
}
