//! Channels to the trainer and the generator: TLS, the bearer-token interceptor, and the one
//! place where transport failures and gRPC statuses become messages a person understands and
//! the documented exit codes.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use synopsis_proto::v1::generator_client::GeneratorClient;
use synopsis_proto::v1::trainer_client::TrainerClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

use crate::cli::GlobalArgs;

/// How long to wait for a TCP/TLS connection before calling a server unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub type TrainerApi = TrainerClient<InterceptedService<Channel, Auth>>;
pub type GeneratorApi = GeneratorClient<InterceptedService<Channel, Auth>>;

/// Which server a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Trainer,
    Generator,
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Service::Trainer => "trainer",
            Service::Generator => "generator",
        })
    }
}

/// Failures that decide the exit code; everything else exits with 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the {service} at {url}: is it running? start it with `{hint}`")]
    Unreachable {
        service: Service,
        url: String,
        hint: String,
    },
    #[error("lost the connection to the {service} at {url}: {detail}")]
    ConnectionLost {
        service: Service,
        url: String,
        detail: String,
    },
    #[error("the {service} refused the request: {code}: {message}")]
    Refused {
        service: Service,
        code: &'static str,
        message: String,
    },
    #[error("{0}")]
    Usage(String),
    #[error("run {run_id} failed: {message}")]
    RunFailed { run_id: String, message: String },
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::RunFailed { .. } => 1,
            CliError::Usage(_) => 2,
            CliError::Refused { .. } => 3,
            CliError::Unreachable { .. } | CliError::ConnectionLost { .. } => 4,
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call when a token is configured.
#[derive(Debug, Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Resolved global options: where the servers are and how to reach them.
#[derive(Debug, Clone)]
pub struct Servers {
    pub trainer_url: String,
    pub generator_url: String,
    auth: Auth,
    tls_ca: Option<Vec<u8>>,
    /// Client certificate and key (PEM) for mutual TLS.
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Servers {
    pub fn from_args(args: &GlobalArgs) -> anyhow::Result<Self> {
        let token = match (&args.token_file, &args.token) {
            (Some(path), _) => Some(read_token(path)?),
            (None, Some(token)) => Some(token.trim().to_string()),
            (None, None) => None,
        };
        let auth = match token.filter(|t| !t.is_empty()) {
            Some(t) => Some(MetadataValue::try_from(format!("Bearer {t}")).map_err(|_| {
                CliError::Usage("the token holds characters not allowed in a header".into())
            })?),
            None => None,
        };
        let tls_ca =
            match &args.tls_ca {
                Some(path) => Some(std::fs::read(path).with_context(|| {
                    format!("cannot read the CA certificate {}", path.display())
                })?),
                None => None,
            };
        let read = |path: &Path, what: &str| {
            std::fs::read(path)
                .with_context(|| format!("cannot read the {what} {}", path.display()))
        };
        let identity = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => {
                Some((read(cert, "client certificate")?, read(key, "client key")?))
            }
            _ => None,
        };
        // With a CA the servers are spoken to over TLS, whatever scheme the URL was given with.
        let scheme = |url: &str| match (&tls_ca, url.strip_prefix("http://")) {
            (Some(_), Some(rest)) => format!("https://{rest}"),
            _ => url.to_string(),
        };
        Ok(Self {
            trainer_url: scheme(&args.trainer),
            generator_url: scheme(&args.generator),
            auth: Auth(auth),
            tls_ca,
            identity,
        })
    }

    pub async fn trainer(&self) -> Result<TrainerApi, CliError> {
        let channel = self.channel(Service::Trainer, &self.trainer_url).await?;
        Ok(TrainerClient::with_interceptor(channel, self.auth.clone()))
    }

    pub async fn generator(&self) -> Result<GeneratorApi, CliError> {
        let channel = self
            .channel(Service::Generator, &self.generator_url)
            .await?;
        Ok(GeneratorClient::with_interceptor(
            channel,
            self.auth.clone(),
        ))
    }

    /// Turns a failed call into the error a person should see.
    pub fn status_error(&self, service: Service, status: Status) -> CliError {
        // A status the client made up from a broken connection (refused, reset, closed mid
        // stream) carries the transport error as its source; one the server sent does not.
        if std::error::Error::source(&status).is_some() {
            return CliError::ConnectionLost {
                service,
                url: self.url(service).to_string(),
                detail: status.message().to_string(),
            };
        }
        CliError::Refused {
            service,
            code: code_name(status.code()),
            message: status.message().to_string(),
        }
    }

    fn url(&self, service: Service) -> &str {
        match service {
            Service::Trainer => &self.trainer_url,
            Service::Generator => &self.generator_url,
        }
    }

    async fn channel(&self, service: Service, url: &str) -> Result<Channel, CliError> {
        check_url(service, url)?;
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| CliError::Usage(format!("invalid {service} URL `{url}`: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT);
        if let Some(pem) = &self.tls_ca {
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let Some((cert, key)) = &self.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| CliError::Usage(format!("cannot use TLS with `{url}`: {e}")))?;
        }
        endpoint.connect().await.map_err(|_| CliError::Unreachable {
            service,
            url: url.to_string(),
            hint: self.start_hint(service, url),
        })
    }

    /// The command that would start the missing server where the CLI looks for it.
    fn start_hint(&self, service: Service, url: &str) -> String {
        let listen = url
            .split_once("://")
            .map_or(url, |(_, rest)| rest)
            .trim_end_matches('/');
        match service {
            Service::Trainer => format!("synopsis-trainer --listen {listen} --root DIR"),
            Service::Generator => format!(
                "synopsis-generator --listen {listen} --trainer {}",
                self.trainer_url
            ),
        }
    }
}

/// A malformed address is a usage error (exit 2) saying what to fix, not an unreachable
/// server (exit 4): `127.0.0.1:50051` lacks its scheme, `notaurl` is no address at all.
pub fn check_url(service: Service, url: &str) -> Result<(), CliError> {
    let flag = format!("--{service}");
    let shown = crate::output::safe_cell(url);
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(CliError::Usage(format!(
            "{flag} `{shown}` is not a URL: add the scheme, e.g. `http://{shown}` \
             (`https://` with --tls-ca)"
        )));
    };
    if scheme != "http" && scheme != "https" {
        return Err(CliError::Usage(format!(
            "{flag} `{shown}` has the scheme `{}`: use http:// or https://",
            crate::output::safe_cell(scheme)
        )));
    }
    let valid = url
        .parse::<tonic::transport::Uri>()
        .ok()
        .and_then(|uri| uri.host().map(|h| !h.is_empty()))
        .unwrap_or(false);
    if !valid || rest.is_empty() {
        return Err(CliError::Usage(format!(
            "{flag} `{shown}` is not a valid address: expected http://HOST:PORT"
        )));
    }
    Ok(())
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    Ok(text.trim().to_string())
}

/// The canonical gRPC name of a status code, as servers and docs spell it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
