//! Credentials on the wire: the `authorization: Bearer TOKEN` metadata that
//! every call carries when the cluster checks tokens. One interceptor for
//! the node (calls to its peers) and for clients.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The metadata key credentials travel in.
pub const AUTHORIZATION: &str = "authorization";

/// Adds a bearer token to every call; `none` adds nothing.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// A token to send; refused when it cannot travel as HTTP/2 metadata.
    pub fn new(secret: &str) -> Result<BearerToken, String> {
        let mut value: MetadataValue<Ascii> =
            format!("Bearer {secret}").parse().map_err(|_| "a token must be printable ASCII without spaces".to_string())?;
        value.set_sensitive(true);
        Ok(BearerToken(Some(value)))
    }

    /// Sends no credentials.
    pub fn none() -> BearerToken {
        BearerToken(None)
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret never reaches a log.
        f.write_str(if self.0.is_some() { "BearerToken(<redacted>)" } else { "BearerToken(none)" })
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert(AUTHORIZATION, v.clone());
        }
        Ok(request)
    }
}
