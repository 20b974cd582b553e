//! TLS and bearer-token settings of a server's listening socket and of the outgoing link to an
//! upstream server, as clap argument groups both binaries flatten into their configs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::auth::BearerInterceptor;

/// How a server guards its gRPC port: TLS (optionally requiring client certificates) and a
/// bearer token every RPC but health checks must carry.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SecurityArgs {
    /// PEM certificate chain served to clients; enables TLS (needs --tls-key).
    #[arg(long, env = "SYNOPSIS_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SYNOPSIS_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).
    #[arg(long, env = "SYNOPSIS_TLS_CLIENT_CA", value_name = "PATH")]
    pub tls_client_ca: Option<PathBuf>,
    /// File holding the bearer token clients must send (`authorization: Bearer <token>`).
    #[arg(long, env = "SYNOPSIS_AUTH_TOKEN_FILE", value_name = "PATH")]
    pub auth_token_file: Option<PathBuf>,
    /// Bearer token clients must send; prefer --auth-token-file (argv is visible to others).
    #[arg(
        long,
        env = "SYNOPSIS_AUTH_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub auth_token: Option<String>,
}

impl SecurityArgs {
    /// The TLS config for `Server::builder().tls_config(..)`, or `None` for plaintext.
    /// Reads and checks the PEM files now, so a bad path or file fails startup naming it.
    pub fn server_tls(&self) -> anyhow::Result<Option<ServerTlsConfig>> {
        let (cert, key) = match (&self.tls_cert, &self.tls_key) {
            (None, None) => {
                if self.tls_client_ca.is_some() {
                    bail!("--tls-client-ca needs --tls-cert and --tls-key");
                }
                return Ok(None);
            }
            (Some(_), None) => bail!("--tls-cert needs --tls-key"),
            (None, Some(_)) => bail!("--tls-key needs --tls-cert"),
            (Some(cert), Some(key)) => (cert, key),
        };
        let cert_pem = read_certs(cert)?;
        let key_pem = read_key(key)?;
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
        if let Some(ca) = &self.tls_client_ca {
            config = config.client_ca_root(Certificate::from_pem(read_certs(ca)?));
        }
        Ok(Some(config))
    }

    /// The token RPCs must carry, from --auth-token or --auth-token-file (not both).
    pub fn auth_token(&self) -> anyhow::Result<Option<String>> {
        match (&self.auth_token, &self.auth_token_file) {
            (Some(_), Some(_)) => bail!("give --auth-token or --auth-token-file, not both"),
            (Some(token), None) => check_token(token.trim(), "--auth-token").map(Some),
            (None, Some(path)) => read_token(path).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// Warns when the server listens beyond this machine with no TLS or no token, because
    /// then anyone on the network can train, read checkpoints or generate.
    pub fn warn_if_exposed(&self, addr: SocketAddr) {
        if addr.ip().is_loopback() {
            return;
        }
        let tls = self.tls_cert.is_some();
        let token = self.auth_token.is_some() || self.auth_token_file.is_some();
        match (tls, token) {
            (false, false) => tracing::warn!(
                %addr,
                "listening on a non-loopback address without TLS or an auth token: \
                 anyone who can reach it can use it (see --tls-cert, --auth-token-file)"
            ),
            (false, true) => tracing::warn!(
                %addr,
                "auth token without TLS on a non-loopback address: the token travels in clear"
            ),
            _ => {}
        }
    }
}

/// How a service reaches its upstream (the generator following a trainer): CA to trust,
/// optional client certificate for mutual TLS, and the bearer token to send.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ClientSecurityArgs {
    /// PEM CA bundle trusted for the upstream's certificate; needs an https:// upstream URL.
    #[arg(long, env = "SYNOPSIS_UPSTREAM_TLS_CA", value_name = "PATH")]
    pub upstream_tls_ca: Option<PathBuf>,
    /// PEM client certificate presented to an upstream that requires mutual TLS.
    #[arg(long, env = "SYNOPSIS_UPSTREAM_TLS_CERT", value_name = "PATH")]
    pub upstream_tls_cert: Option<PathBuf>,
    /// PEM private key of --upstream-tls-cert.
    #[arg(long, env = "SYNOPSIS_UPSTREAM_TLS_KEY", value_name = "PATH")]
    pub upstream_tls_key: Option<PathBuf>,
    /// Name to verify in the upstream's certificate, when it differs from the URL's host.
    #[arg(long, env = "SYNOPSIS_UPSTREAM_TLS_DOMAIN", value_name = "NAME")]
    pub upstream_tls_domain: Option<String>,
    /// File holding the bearer token sent to the upstream.
    #[arg(long, env = "SYNOPSIS_UPSTREAM_TOKEN_FILE", value_name = "PATH")]
    pub upstream_token_file: Option<PathBuf>,
    /// Bearer token sent to the upstream; prefer --upstream-token-file.
    #[arg(
        long,
        env = "SYNOPSIS_UPSTREAM_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub upstream_token: Option<String>,
}

impl ClientSecurityArgs {
    /// An endpoint for `url` with TLS configured when the URL is `https://`.
    pub fn endpoint(&self, url: &str) -> anyhow::Result<Endpoint> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("invalid upstream URL {url:?}"))?;
        let https = endpoint.uri().scheme_str() == Some("https");
        let wants_tls = self.upstream_tls_ca.is_some()
            || self.upstream_tls_cert.is_some()
            || self.upstream_tls_key.is_some()
            || self.upstream_tls_domain.is_some();
        if !https {
            // tonic would silently ignore a TLS config on an http:// URL and send plaintext.
            if wants_tls {
                bail!("upstream TLS options need an https:// URL, got {url:?}");
            }
            return Ok(endpoint);
        }
        let Some(ca) = &self.upstream_tls_ca else {
            bail!("https upstream {url:?} needs --upstream-tls-ca");
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_certs(ca)?));
        match (&self.upstream_tls_cert, &self.upstream_tls_key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(read_certs(cert)?, read_key(key)?));
            }
            (None, None) => {}
            (Some(_), None) => bail!("--upstream-tls-cert needs --upstream-tls-key"),
            (None, Some(_)) => bail!("--upstream-tls-key needs --upstream-tls-cert"),
        }
        if let Some(domain) = &self.upstream_tls_domain {
            tls = tls.domain_name(domain.clone());
        }
        endpoint
            .tls_config(tls)
            .context("invalid upstream TLS configuration")
    }

    /// The `authorization` value (`Bearer <token>`) to send upstream, if a token is set.
    pub fn bearer(&self) -> anyhow::Result<Option<MetadataValue<Ascii>>> {
        let token = match (&self.upstream_token, &self.upstream_token_file) {
            (Some(_), Some(_)) => {
                bail!("give --upstream-token or --upstream-token-file, not both")
            }
            (Some(token), None) => check_token(token.trim(), "--upstream-token")?,
            (None, Some(path)) => read_token(path)?,
            (None, None) => return Ok(None),
        };
        let value = format!("Bearer {token}")
            .parse()
            .context("upstream token is not a valid header value")?;
        Ok(Some(value))
    }

    /// An interceptor adding [`Self::bearer`] to every call:
    /// `TrainerClient::with_interceptor(channel, args.interceptor()?)`.
    pub fn interceptor(&self) -> anyhow::Result<BearerInterceptor> {
        Ok(BearerInterceptor::new(self.bearer()?))
    }
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read certificate file {}", path.display()))?;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.with_context(|| format!("invalid PEM certificate in {}", path.display()))?;
        count += 1;
    }
    if count == 0 {
        bail!("no PEM certificate found in {}", path.display());
    }
    Ok(pem)
}

fn read_key(path: &Path) -> anyhow::Result<Vec<u8>> {
    let pem =
        std::fs::read(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .with_context(|| format!("no valid PEM private key in {}", path.display()))?;
    Ok(pem)
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    check_token(text.trim(), &path.display().to_string())
}

/// A token must be non-empty visible ASCII so it fits an HTTP header unchanged.
fn check_token(token: &str, source: &str) -> anyhow::Result<String> {
    if token.is_empty() {
        bail!("auth token from {source} is empty");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("auth token from {source} must be printable ASCII without spaces");
    }
    Ok(token.to_owned())
}
