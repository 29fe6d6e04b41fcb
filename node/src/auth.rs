//! Who may call what.
//!
//! A cluster that has tokens configured (`auth_tokens`, `auth_tokens_file`)
//! takes a call only with `authorization: Bearer SECRET` naming one of them.
//! Each token has a name (recorded in the audit log as the caller) and a
//! role:
//! - `client`: what a backend service needs: `Identify`, `IdentifyStream`,
//!   `GetProfile`, `GetMergeRecord`, `GetRoutes` (and reflection);
//! - `admin`: everything a client may, plus `Merge`, `Unmerge`,
//!   `DeleteProfile` and the whole `Admin` service;
//! - `peer`: the nodes themselves (the Raft transport, and joining); a node
//!   sends the first peer token it has to its peers.
//!
//! One tower layer ([`AuthLayer`]) in front of every gRPC service checks the
//! call before any handler runs, so a refused call changes nothing: no or an
//! unknown token is UNAUTHENTICATED, a known token without the role
//! PERMISSION_DENIED. The health service stays open (probes carry no
//! token). With `tls_peer_mtls`, Raft transport calls also need a client
//! certificate that the cluster's authority signed (checked by rustls during
//! the handshake; here only that one was presented).
//!
//! Secrets are compared in constant time and never logged; the token file
//! is read again when it changes, so a token is added or revoked without a
//! restart. A call that stays open (a stream) keeps its [`Grant`] and checks
//! it again as it goes, so a revoked token also ends the streams opened
//! with it.

use crate::reload::{spawn_reloads, Reloading};
use idgraph_proto::auth::AUTHORIZATION;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use subtle::ConstantTimeEq;
use tonic::Status;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Client,
    Admin,
    Peer,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Admin => "admin",
            Role::Peer => "peer",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        match s {
            "client" => Some(Role::Client),
            "admin" => Some(Role::Admin),
            "peer" => Some(Role::Peer),
            _ => None,
        }
    }

    /// Whether a token of this role may make a call that needs `needed`:
    /// admin includes client, and peer (the cluster itself) everything.
    pub fn may(self, needed: Role) -> bool {
        self >= needed
    }
}

/// The role a call needs, by its gRPC path; `None`: open to anyone.
pub fn needed_role(path: &str) -> Option<Role> {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    match service {
        "grpc.health.v1.Health" => None,
        "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection" => Some(Role::Client),
        "idgraph.v1.IdentityGraph" => match method {
            "Identify" | "IdentifyStream" | "GetProfile" | "GetMergeRecord" | "GetRoutes" => Some(Role::Client),
            _ => Some(Role::Admin),
        },
        "idgraph.v1.RaftTransport" => Some(Role::Peer),
        // The Admin service, and anything unknown.
        _ => Some(Role::Admin),
    }
}

/// A configured token.
#[derive(Clone)]
struct Token {
    name: Arc<str>,
    role: Role,
    secret: Vec<u8>,
}

/// Why a token list was refused; names the entry, never its secret.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{source_name} entry {entry}: {reason}")]
    Invalid { source_name: String, entry: usize, reason: String },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the token file no longer holds a peer token (add the new peer token before removing the old one)")]
    PeerTokenDropped,
}

/// The tokens a node accepts.
#[derive(Clone, Default)]
pub struct TokenBook {
    tokens: Vec<Token>,
}

/// Shortest secret accepted.
const MIN_SECRET: usize = 16;

impl TokenBook {
    /// Parses `NAME:ROLE:SECRET` entries separated by commas or new lines;
    /// `#` starts a comment. `source_name` names the text in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<TokenBook, TokenError> {
        let mut tokens: Vec<Token> = Vec::new();
        let entries = text.lines().map(|l| l.split('#').next().unwrap_or_default()).flat_map(|l| l.split(','));
        for (i, entry) in entries.map(str::trim).filter(|e| !e.is_empty()).enumerate() {
            let bad = |reason: &str| TokenError::Invalid { source_name: source_name.into(), entry: i + 1, reason: reason.into() };
            let mut parts = entry.splitn(3, ':');
            let (Some(name), Some(role), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad("expected NAME:ROLE:SECRET"));
            };
            let (name, secret) = (name.trim(), secret.trim());
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)) {
                return Err(bad("the name must be letters, digits, '-', '_', '.' or '@'"));
            }
            let role = Role::parse(role.trim()).ok_or_else(|| bad("the role must be client, admin or peer"))?;
            if secret.len() < MIN_SECRET || !secret.chars().all(|c| c.is_ascii_graphic()) {
                return Err(bad("the secret must be at least 16 printable characters without spaces"));
            }
            if tokens.iter().any(|t| &*t.name == name) {
                return Err(bad(&format!("the name {name} is given twice")));
            }
            if tokens.iter().any(|t| t.secret == secret.as_bytes()) {
                return Err(bad("two tokens have the same secret"));
            }
            tokens.push(Token { name: name.into(), role, secret: secret.as_bytes().to_vec() });
        }
        Ok(TokenBook { tokens })
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// The token with this secret. Every token is compared, in constant
    /// time, whichever matches.
    fn find(&self, secret: &[u8]) -> Option<&Token> {
        let mut found = None;
        for t in &self.tokens {
            if bool::from(t.secret.as_slice().ct_eq(secret)) {
                found = Some(t);
            }
        }
        found
    }

    /// The secret this node sends to its peers: its first peer token.
    pub fn peer_secret(&self) -> Option<String> {
        self.tokens.iter().find(|t| t.role == Role::Peer).map(|t| String::from_utf8_lossy(&t.secret).into_owned())
    }

    fn merged(mut self, other: TokenBook, source_name: &str) -> Result<TokenBook, TokenError> {
        for t in other.tokens {
            if self.tokens.iter().any(|s| s.name == t.name || s.secret == t.secret) {
                return Err(TokenError::Invalid {
                    source_name: source_name.into(),
                    entry: 0,
                    reason: format!("token {} is also in auth_tokens", t.name),
                });
            }
            self.tokens.push(t);
        }
        Ok(self)
    }
}

/// Who made a call, as its token names it; in the request's extensions
/// once [`AuthLayer`] took it.
#[derive(Clone, Debug)]
pub struct Caller {
    pub name: Arc<str>,
    pub role: Role,
    /// What let the call in, to check again while it runs.
    pub grant: Grant,
}

impl Caller {
    /// The caller's name for the audit log: its token's name, `anonymous`
    /// on a node that checks no tokens.
    pub fn name_of<T>(request: &tonic::Request<T>) -> String {
        request.extensions().get::<Caller>().map_or_else(|| "anonymous".to_string(), |c| c.name.to_string())
    }

    /// The grant a call was let in with; `None` on a node that checks no
    /// tokens.
    pub fn grant_of<T>(request: &tonic::Request<T>) -> Option<Grant> {
        request.extensions().get::<Caller>().map(|c| c.grant.clone())
    }
}

/// The token a call was let in with and the role it needed. A call that
/// stays open (a stream) checks it again as it goes, so that a token
/// revoked in the token file (or given a lesser role) ends the streams
/// opened with it, not only the calls made after.
#[derive(Clone)]
pub struct Grant {
    tokens: Arc<Tokens>,
    secret: Arc<[u8]>,
    needed: Role,
    /// The method, for messages.
    method: Arc<str>,
}

impl std::fmt::Debug for Grant {
    /// Never the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant").field("needed", &self.needed).field("method", &self.method).finish_non_exhaustive()
    }
}

impl Grant {
    /// The caller the token names as of now, or the status to refuse the
    /// call with.
    fn caller(&self) -> Result<Caller, Status> {
        let book = self.tokens.current();
        let Some(token) = book.find(&self.secret) else {
            return Err(Status::unauthenticated("unknown or revoked token"));
        };
        if !token.role.may(self.needed) {
            return Err(Status::permission_denied(format!(
                "token {} has the role {}; {} needs the role {}",
                token.name,
                token.role.name(),
                self.method,
                self.needed.name()
            )));
        }
        Ok(Caller { name: token.name.clone(), role: token.role, grant: self.clone() })
    }

    /// Checks the token again (a stream, before each message it takes or
    /// sends): the status to end the call with once it no longer passes.
    pub fn check(&self) -> Result<(), Status> {
        self.caller().map(|_| ()).map_err(|s| Status::new(s.code(), format!("{}: the stream opened with it ends", s.message())))
    }

    /// [`Grant::check`] for a call that may have no grant (a node that
    /// checks no tokens), which always passes.
    pub fn recheck(grant: &Option<Grant>) -> Result<(), Status> {
        grant.as_ref().map_or(Ok(()), Grant::check)
    }
}

/// The node's tokens: `auth_tokens` and the token file, which is read again
/// when it changes.
pub struct Tokens {
    inline: TokenBook,
    file: Option<PathBuf>,
    book: Reloading<TokenBook>,
}

impl Tokens {
    /// Loads both sources; an error names the field or file. A token file
    /// that holds no token is refused: a node given one means to check
    /// tokens.
    pub fn load(inline: &str, file: Option<&Path>) -> Result<Arc<Tokens>, TokenError> {
        let inline = TokenBook::parse(inline, "auth_tokens")?;
        let file = file.map(Path::to_path_buf);
        let book = Reloading::load("token file", file.iter().cloned().collect(), || read_book(&inline, file.as_deref()))?;
        Ok(Arc::new(Tokens { inline, file, book }))
    }

    /// The tokens as of now.
    pub fn current(&self) -> Arc<TokenBook> {
        self.book.current()
    }

    /// Reads the token file again if it changed; a file that no longer
    /// parses, holds no token, or drops the last peer token of a node that
    /// had one keeps the tokens in force (and is logged, without secrets).
    pub fn reload(&self) {
        self.book.reload(|old| {
            let book = read_book(&self.inline, self.file.as_deref())?;
            if old.peer_secret().is_some() && book.peer_secret().is_none() {
                return Err(TokenError::PeerTokenDropped);
            }
            Ok(book)
        })
    }

    /// Checks the token file for changes every `every` until dropped.
    pub fn spawn_reloader(self: &Arc<Tokens>, every: Duration) -> tokio::task::JoinHandle<()> {
        spawn_reloads(self, every, Tokens::reload)
    }

    /// Decides a call: the caller it names, or the status to refuse it with.
    pub fn check(
        self: &Arc<Self>,
        path: &str,
        headers: &http::HeaderMap,
        has_client_cert: bool,
        peer_mtls: bool,
    ) -> Result<Option<Caller>, Status> {
        let Some(needed) = needed_role(path) else { return Ok(None) };
        if peer_mtls && needed == Role::Peer && !has_client_cert {
            return Err(Status::unauthenticated("peer calls need a client certificate signed by the cluster's certificate authority"));
        }
        let book = self.current();
        if book.is_empty() {
            return Ok(None);
        }
        let Some(value) = headers.get(AUTHORIZATION) else {
            return Err(Status::unauthenticated("missing credentials: send the metadata `authorization: Bearer TOKEN`"));
        };
        let secret = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).map(str::trim).unwrap_or_default();
        if secret.is_empty() {
            return Err(Status::unauthenticated("the `authorization` metadata must be `Bearer TOKEN`"));
        }
        let method = path.rsplit('/').next().unwrap_or(path);
        Grant { tokens: self.clone(), secret: Arc::from(secret.as_bytes()), needed, method: Arc::from(method) }.caller().map(Some)
    }
}

/// The inline tokens and those of the token file, if any.
fn read_book(inline: &TokenBook, file: Option<&Path>) -> Result<TokenBook, TokenError> {
    let Some(path) = file else { return Ok(inline.clone()) };
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Io { path: path.to_path_buf(), source })?;
    let name = path.display().to_string();
    let from_file = TokenBook::parse(&text, &name)?;
    if from_file.is_empty() {
        // Checked on every read: a file emptied (or cut short by an editor)
        // must not turn the checks off.
        return Err(TokenError::Invalid { source_name: name, entry: 0, reason: "holds no token".into() });
    }
    inline.clone().merged(from_file, &name)
}

/// The credentials a node sends to its peers: the first peer token in
/// force, read at each call (a rotated peer token is used at once).
#[derive(Clone, Default)]
pub struct PeerCredentials(Option<Arc<Tokens>>);

impl PeerCredentials {
    pub fn new(tokens: Arc<Tokens>) -> PeerCredentials {
        PeerCredentials(Some(tokens))
    }
}

impl tonic::service::Interceptor for PeerCredentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(secret) = self.0.as_ref().and_then(|t| t.current().peer_secret()) {
            let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                format!("Bearer {secret}").parse().map_err(|_| Status::internal("the peer token cannot travel as metadata"))?;
            value.set_sensitive(true);
            request.metadata_mut().insert(AUTHORIZATION, value);
        }
        Ok(request)
    }
}

/// The tower layer that checks every call (see the module doc).
#[derive(Clone)]
pub struct AuthLayer {
    tokens: Arc<Tokens>,
    peer_mtls: bool,
}

impl AuthLayer {
    pub fn new(tokens: Arc<Tokens>, peer_mtls: bool) -> AuthLayer {
        AuthLayer { tokens, peer_mtls }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Authenticated<S> {
        Authenticated { inner, tokens: self.tokens.clone(), peer_mtls: self.peer_mtls }
    }
}

/// A gRPC service behind [`AuthLayer`].
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    tokens: Arc<Tokens>,
    peer_mtls: bool,
}

type TlsInfo = tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>;

impl<S, B> tower::Service<http::Request<B>> for Authenticated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<futures::future::Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let has_cert = request.extensions().get::<TlsInfo>().and_then(|i| i.peer_certs()).is_some_and(|c| !c.is_empty());
        match self.tokens.check(request.uri().path(), request.headers(), has_cert, self.peer_mtls) {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                futures::future::Either::Right(self.inner.call(request))
            }
            Err(status) => futures::future::Either::Left(futures::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(token: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(t) = token {
            h.insert(AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        }
        h
    }

    const BOOK: &str =
        "svc:client:client-secret-0123456789\nops:admin:admin-secret-0123456789 # the on-call team\n\nnodes:peer:peer-secret-0123456789";

    #[test]
    fn roles_decide_each_method_and_refusals_say_why() {
        let tokens = Tokens::load(BOOK, None).unwrap();
        let call = |path: &str, token: Option<&str>| tokens.check(path, &headers(token), false, false);
        let client = Some("client-secret-0123456789");
        let admin = Some("admin-secret-0123456789");
        let peer = Some("peer-secret-0123456789");
        assert_eq!(call("/idgraph.v1.IdentityGraph/Identify", client).unwrap().unwrap().name.as_ref(), "svc");
        assert_eq!(call("/idgraph.v1.IdentityGraph/GetProfile", admin).unwrap().unwrap().role, Role::Admin);
        for path in ["/idgraph.v1.IdentityGraph/DeleteProfile", "/idgraph.v1.Admin/PutRuleSet", "/idgraph.v1.RaftTransport/Vote"] {
            let e = call(path, client).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{path}");
            assert!(e.message().contains("token svc has the role client"), "{}", e.message());
        }
        assert!(call("/idgraph.v1.Admin/PutRuleSet", admin).is_ok());
        assert_eq!(call("/idgraph.v1.RaftTransport/Vote", admin).unwrap_err().code(), tonic::Code::PermissionDenied);
        assert!(call("/idgraph.v1.RaftTransport/Vote", peer).is_ok());
        for bad in [None, Some("nope-nope-nope-nope-nope")] {
            assert_eq!(call("/idgraph.v1.IdentityGraph/Identify", bad).unwrap_err().code(), tonic::Code::Unauthenticated);
        }
        // Probes carry no token.
        assert!(call("/grpc.health.v1.Health/Check", None).unwrap().is_none());
        // A peer call without a client certificate, when peers need one.
        let e = tokens.check("/idgraph.v1.RaftTransport/Vote", &headers(peer), false, true).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(tokens.check("/idgraph.v1.RaftTransport/Vote", &headers(peer), true, true).is_ok());
        assert_eq!(tokens.current().peer_secret().as_deref(), peer);
    }

    #[test]
    fn bad_token_lists_name_the_entry_and_never_the_secret() {
        for (text, says) in [
            ("a:client", "NAME:ROLE:SECRET"),
            ("a:root:0123456789abcdef", "client, admin or peer"),
            ("a:client:short", "at least 16"),
            ("a b:client:0123456789abcdef", "the name"),
            ("a:client:0123456789abcdef,a:admin:0123456789abcdeg", "given twice"),
            ("a:client:0123456789abcdef,b:admin:0123456789abcdef", "same secret"),
        ] {
            let e = TokenBook::parse(text, "auth_tokens").err().expect(text).to_string();
            assert!(e.contains(says) && e.contains("auth_tokens entry"), "{text}: {e}");
            assert!(!e.contains("0123456789abcde"), "{e}");
        }
        assert!(TokenBook::parse("", "x").unwrap().is_empty());
    }

    #[test]
    fn the_token_file_is_read_again_when_it_changes_and_a_broken_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(&f, "a:client:aaaaaaaaaaaaaaaaaaaa\n").unwrap();
        let tokens = Tokens::load("", Some(&f)).unwrap();
        let ok = |secret: &str| tokens.check("/idgraph.v1.IdentityGraph/Identify", &headers(Some(secret)), false, false).is_ok();
        assert!(ok("aaaaaaaaaaaaaaaaaaaa"));
        // Revoke a, add b (a later modification time than the first write).
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&f, "b:client:bbbbbbbbbbbbbbbbbbbb\n").unwrap();
        let later = std::time::SystemTime::now() + Duration::from_secs(2);
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(later).unwrap();
        tokens.reload();
        assert!(!ok("aaaaaaaaaaaaaaaaaaaa") && ok("bbbbbbbbbbbbbbbbbbbb"));
        std::fs::write(&f, "garbage").unwrap();
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(later + Duration::from_secs(2)).unwrap();
        tokens.reload();
        assert!(ok("bbbbbbbbbbbbbbbbbbbb"), "a broken file keeps the tokens in force");
        // An emptied file does not turn the checks off.
        std::fs::write(&f, "# nothing here\n").unwrap();
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(later + Duration::from_secs(4)).unwrap();
        tokens.reload();
        assert!(ok("bbbbbbbbbbbbbbbbbbbb") && !tokens.current().is_empty());
        assert!(Tokens::load("", Some(&f)).is_err(), "a token file without tokens is refused at start");
    }
}
