//! A value read from files and read again when they change: the token file
//! ([`crate::auth`]) and the TLS certificate and key ([`crate::tls`]). A
//! change that does not load keeps the value in force, and says why in the
//! log.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tracing::{info, warn};

/// The files' modification times; `None` while one cannot be read.
type Stamps = Option<Vec<SystemTime>>;

pub struct Reloading<T> {
    /// What the value is, for the log ("token file", "TLS certificate").
    what: &'static str,
    paths: Vec<PathBuf>,
    state: RwLock<(Stamps, Arc<T>)>,
}

impl<T> Reloading<T> {
    /// Reads the value with `read`; the files' times are taken first, so a
    /// change made while it reads is read again later.
    pub fn load<E>(what: &'static str, paths: Vec<PathBuf>, read: impl FnOnce() -> Result<T, E>) -> Result<Reloading<T>, E> {
        let stamps = stamps(&paths);
        let value = read()?;
        Ok(Reloading { what, paths, state: RwLock::new((stamps, Arc::new(value))) })
    }

    /// The value as of now.
    pub fn current(&self) -> Arc<T> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    /// Reads the value again with `read` (given the value in force) if a
    /// file changed since it was last read; a value that does not load keeps
    /// the one in force. With no files, nothing ever changes.
    pub fn reload<E: std::fmt::Display>(&self, read: impl FnOnce(&T) -> Result<T, E>) {
        let now = stamps(&self.paths);
        if now.is_none() || now == self.state.read().unwrap_or_else(|e| e.into_inner()).0 {
            return;
        }
        match read(&self.current()) {
            Ok(value) => {
                info!(what = self.what, "read again after its files changed");
                *self.state.write().unwrap_or_else(|e| e.into_inner()) = (now, Arc::new(value));
            }
            Err(e) => warn!(what = self.what, error = %e, "its files changed but cannot be used; the one in force stays"),
        }
    }
}

fn stamps(paths: &[PathBuf]) -> Stamps {
    paths.iter().map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).collect()
}

/// Calls `reload` on `what` every `every` until `what` is dropped.
pub fn spawn_reloads<T: Send + Sync + 'static>(what: &Arc<T>, every: Duration, reload: fn(&T)) -> tokio::task::JoinHandle<()> {
    let what = Arc::downgrade(what);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match what.upgrade() {
                Some(t) => reload(&t),
                None => return,
            }
        }
    })
}
