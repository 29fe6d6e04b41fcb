//! idgraph-client: a Rust client for idgraph and the library behind
//! `idgraphctl`.
//!
//! - [`Client`]: connects to a node and exposes the generated
//!   `IdentityGraph` and `Admin` clients.
//! - [`Cluster`] (`routing`): a whole cluster, each request sent to the
//!   node leading its home shard.
//! - [`load`](mod@load): bulk loading, each event over an `IdentifyStream`
//!   to its home shard's leader, sent again if its node is lost, with a
//!   summary; [`EventLine`] is one identity event as a JSON line, the
//!   format of `idgraphctl load`.

use idgraph_proto::auth::BearerToken;
use idgraph_proto::v1 as pb;
use pb::admin_client::AdminClient;
use pb::identity_graph_client::IdentityGraphClient;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

pub use idgraph_proto;
pub use load::{count_events, load, EventLine, EventLines, IdentifierLine, LoadOptions, LoadSummary};
pub use routing::Cluster;

pub mod load;
pub mod routing;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid endpoint {endpoint}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("{}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("line {line}: {reason}")]
    BadLine { line: usize, reason: String },
    #[error("reading input: {0}")]
    Io(#[from] std::io::Error),
}

/// How a client proves who it is and checks the node: a bearer token
/// (`--token`, `IDGRAPH_TOKEN`) and the certificate authority that signed
/// the node's certificate (`--ca-cert`; with it, or an `https://`
/// endpoint, the connection is TLS).
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub token: Option<String>,
    pub ca_cert: Option<std::path::PathBuf>,
    /// The name the node's certificate must carry, when it differs from the
    /// endpoint's host (an address, a tunnel).
    pub tls_domain: Option<String>,
}

/// The channel every call of a [`Client`] goes over, with its token.
pub type Transport = InterceptedService<Channel, BearerToken>;

/// A connection to one idgraph node.
#[derive(Clone)]
pub struct Client {
    graph: IdentityGraphClient<Transport>,
    admin: AdminClient<Transport>,
    channel: Channel,
}

impl Client {
    /// Connects to `endpoint` (`http://host:port`; a bare `host:port` is
    /// taken as plain-text HTTP/2) without credentials.
    pub async fn connect(endpoint: &str) -> Result<Client, ClientError> {
        Client::connect_with(endpoint, &Credentials::default()).await
    }

    /// Connects to `endpoint` with `credentials`.
    pub async fn connect_with(endpoint: &str, credentials: &Credentials) -> Result<Client, ClientError> {
        let (ep, token) = Client::endpoint(endpoint, credentials)?;
        let channel = ep.connect_timeout(Duration::from_secs(5)).connect().await.map_err(|e| ClientError::Connect {
            endpoint: endpoint.into(),
            reason: format!("{e} ({})", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default()),
        })?;
        Ok(Client::over(channel, token))
    }

    /// A client of `endpoint` that dials it when first used (and again
    /// after the connection is lost).
    pub fn connect_lazy(endpoint: &str, credentials: &Credentials) -> Result<Client, ClientError> {
        let (ep, token) = Client::endpoint(endpoint, credentials)?;
        Ok(Client::over(ep.connect_timeout(Duration::from_secs(5)).connect_lazy(), token))
    }

    /// The endpoint to dial for `endpoint` and the token to send.
    fn endpoint(endpoint: &str, credentials: &Credentials) -> Result<(Endpoint, BearerToken), ClientError> {
        let bad = |reason: String| ClientError::Endpoint { endpoint: endpoint.into(), reason };
        let tls = credentials.ca_cert.is_some() || endpoint.starts_with("https://");
        // A CA certificate means TLS: an http:// endpoint is not dialled in
        // plain text with the token in it.
        let bare = bare_address(endpoint);
        let uri = if tls { format!("https://{bare}") } else { format!("http://{bare}") };
        let mut ep = Endpoint::from_shared(uri).map_err(|e| bad(e.to_string()))?.tcp_nodelay(true);
        if tls {
            let mut config = ClientTlsConfig::new().with_webpki_roots();
            if let Some(ca) = &credentials.ca_cert {
                let pem = std::fs::read(ca).map_err(|e| bad(format!("--ca-cert {}: {e}", ca.display())))?;
                config = config.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some(domain) = &credentials.tls_domain {
                config = config.domain_name(domain.clone());
            }
            ep = ep.tls_config(config).map_err(|e| bad(e.to_string()))?;
        }
        let token = match &credentials.token {
            Some(t) => BearerToken::new(t.trim()).map_err(|e| bad(format!("--token: {e}")))?,
            None => BearerToken::none(),
        };
        Ok((ep, token))
    }

    fn over(channel: Channel, token: BearerToken) -> Client {
        let max = 64 * 1024 * 1024;
        Client {
            graph: IdentityGraphClient::with_interceptor(channel.clone(), token.clone()).max_decoding_message_size(max),
            admin: AdminClient::with_interceptor(channel.clone(), token).max_decoding_message_size(max),
            channel,
        }
    }

    pub fn graph(&mut self) -> &mut IdentityGraphClient<Transport> {
        &mut self.graph
    }

    pub fn admin(&mut self) -> &mut AdminClient<Transport> {
        &mut self.admin
    }

    /// The connection itself, without the token (for a caller that builds
    /// its own generated client over it).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The node's health (`grpc.health.v1`, no token needed): whether it
    /// serves its shards.
    pub async fn serving(&self) -> Result<bool, ClientError> {
        let mut health = HealthClient::new(self.channel.clone());
        let answer = health.check(HealthCheckRequest { service: String::new() }).await?.into_inner();
        Ok(answer.status == ServingStatus::Serving as i32)
    }
}

/// An endpoint's `host:port`: without its `http://` or `https://` and a
/// trailing slash.
fn bare_address(endpoint: &str) -> &str {
    endpoint.strip_prefix("http://").or_else(|| endpoint.strip_prefix("https://")).unwrap_or(endpoint).trim_end_matches('/')
}

/// `type=value` as an identifier.
pub fn parse_identifier(s: &str) -> Result<pb::Identifier, String> {
    match s.split_once('=') {
        Some((t, v)) if !t.trim().is_empty() => Ok(pb::Identifier { r#type: t.trim().to_string(), value: v.to_string() }),
        _ => Err(format!("expected TYPE=VALUE (e.g. email=ann@shop.com), got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_parse_from_type_equals_value() {
        let id = parse_identifier("email=a=b@c.de").unwrap();
        assert_eq!((id.r#type.as_str(), id.value.as_str()), ("email", "a=b@c.de"));
        assert!(parse_identifier("novalue").is_err());
        assert!(parse_identifier("=x").is_err());
    }
}
