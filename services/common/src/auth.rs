//! Bearer-token auth for every RPC of a server, as a tower layer over the whole router, so no
//! service can be added without it. The token is compared in constant time.
//!
//! Exempt: `grpc.health.v1.Health`, because kubelets and load balancers probe it without
//! credentials and it reveals nothing but "serving or not". Reflection stays behind the
//! token: it lists the whole API surface. With grpcurl pass
//! `-H 'authorization: Bearer <token>'`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};

/// Request paths starting with this go through without a token.
pub const HEALTH_PATH_PREFIX: &str = "/grpc.health.v1.Health/";

/// Tower layer checking `authorization: Bearer <token>`; apply it with
/// `tonic::transport::Server::builder().layer(auth_layer(token))`.
#[derive(Clone, Default)]
pub struct AuthLayer {
    token: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token itself.
        f.debug_struct("AuthLayer")
            .field("enabled", &self.token.is_some())
            .finish()
    }
}

/// An [`AuthLayer`] requiring `token` on every RPC but health checks; `None` lets all through.
pub fn auth_layer(token: Option<String>) -> AuthLayer {
    AuthLayer {
        token: token.map(|t| Arc::from(t.into_bytes())),
    }
}

impl AuthLayer {
    /// Whether requests are checked at all.
    pub fn is_enabled(&self) -> bool {
        self.token.is_some()
    }

    /// Whether a request to `path` carrying `authorization` (the raw header) may pass.
    fn allows(&self, path: &str, authorization: Option<&[u8]>) -> bool {
        let Some(expected) = &self.token else {
            return true;
        };
        if path.starts_with(HEALTH_PATH_PREFIX) {
            return true;
        }
        let Some(presented) = authorization.and_then(bearer_token) else {
            return false;
        };
        // Length is not secret; the contents are compared without early exit.
        presented.ct_eq(expected).into()
    }
}

/// The token after a case-insensitive `Bearer ` scheme, surrounding spaces ignored.
fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if header.len() < SCHEME.len() || !header[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    Some(header[SCHEME.len()..].trim_ascii())
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around a router.
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AuthService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let authorization = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        if self.layer.allows(req.uri().path(), authorization) {
            Box::pin(self.inner.call(req))
        } else {
            tracing::debug!(
                path = req.uri().path(),
                "rejected request without a valid token"
            );
            let status = tonic::Status::unauthenticated("missing or invalid bearer token");
            Box::pin(std::future::ready(Ok(status.into_http())))
        }
    }
}

/// Client interceptor adding `authorization: Bearer <token>` to every call (or nothing when
/// built from `None`). Build it with [`crate::ClientSecurityArgs::interceptor`].
#[derive(Clone, Default)]
pub struct BearerInterceptor {
    header: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for BearerInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerInterceptor")
            .field("enabled", &self.header.is_some())
            .finish()
    }
}

impl BearerInterceptor {
    /// Sends `header` (the whole value, `Bearer <token>`) on every call.
    pub fn new(header: Option<MetadataValue<Ascii>>) -> Self {
        Self { header }
    }
}

impl tonic::service::Interceptor for BearerInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = &self.header {
            req.metadata_mut().insert("authorization", header.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_the_bearer_token() {
        let layer = auth_layer(Some("s3cret".into()));
        let path = "/synopsis.v1.Generator/Generate";
        assert!(layer.allows(path, Some(b"Bearer s3cret")));
        assert!(layer.allows(path, Some(b"bearer s3cret ")));
        assert!(!layer.allows(path, Some(b"Bearer s3cres")));
        assert!(!layer.allows(path, Some(b"Bearer s3cret2")));
        assert!(!layer.allows(path, Some(b"s3cret")));
        assert!(!layer.allows(path, Some(b"Basic s3cret")));
        assert!(!layer.allows(path, None));
        assert!(layer.allows("/grpc.health.v1.Health/Check", None));
        assert!(!layer.allows(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            None
        ));
    }

    #[test]
    fn no_token_lets_everything_through() {
        let layer = auth_layer(None);
        assert!(!layer.is_enabled());
        assert!(layer.allows("/synopsis.v1.Trainer/Train", None));
    }
}
