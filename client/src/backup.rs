//! `idgraphctl backup DIR` and `idgraphctl restore DIR`: a backup as files.
//!
//! A backup directory holds `manifest.json` (as the node wrote it: format,
//! shard count, time, the metadata kept), `shard-NNNN.img` (each shard's
//! image) and `digests.json` (each image's xxh3-64, which the restoring
//! node checks).

use crate::render::Render;
use anyhow::{bail, Context, Result};
use futures::StreamExt;
use idgraph_client::idgraph_proto::v1 as pb;
use idgraph_client::Client;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// What `idgraphctl backup` wrote.
#[derive(Serialize)]
pub struct Written {
    pub dir: String,
    pub shards: usize,
    pub bytes: u64,
}

impl Render for Written {
    fn human(&self) -> String {
        format!("backed up {} shards ({} bytes) into {}", self.shards, self.bytes, self.dir)
    }
}

/// What `idgraphctl restore` restored.
#[derive(Serialize)]
pub struct Restored {
    pub dir: String,
    pub shards: u32,
    pub bytes: u64,
}

impl Render for Restored {
    fn human(&self) -> String {
        format!("restored {} shards ({} bytes) from {}", self.shards, self.bytes, self.dir)
    }
}

fn image_path(dir: &Path, shard: u32) -> PathBuf {
    dir.join(format!("shard-{shard:04}.img"))
}

/// Takes a backup into `dir`, which must not exist or be empty.
pub async fn write(client: &mut Client, dir: &Path, progress: bool) -> Result<Written> {
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} is not empty: a backup goes into a new directory", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let bar = if progress { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bytes} ({bytes_per_sec}) {msg}")?);
    let mut stream = client.admin().backup(pb::BackupRequest {}).await?.into_inner();
    let first = stream.next().await.context("the node sent no manifest")??;
    std::fs::write(dir.join("manifest.json"), &first.manifest_json)?;
    let mut digests: BTreeMap<u32, String> = BTreeMap::new();
    let mut file: Option<(u32, std::fs::File)> = None;
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if file.as_ref().is_none_or(|(s, _)| *s != chunk.shard) {
            bar.set_message(format!("shard {}", chunk.shard));
            file = Some((chunk.shard, std::fs::File::create(image_path(dir, chunk.shard))?));
        }
        if let Some((_, f)) = file.as_mut() {
            f.write_all(&chunk.data)?;
        }
        bytes += chunk.data.len() as u64;
        bar.set_position(bytes);
        if !chunk.digest.is_empty() {
            if let Some((_, f)) = file.take() {
                f.sync_all()?;
            }
            digests.insert(chunk.shard, chunk.digest);
        }
    }
    std::fs::write(dir.join("digests.json"), serde_json::to_string_pretty(&digests)?)?;
    bar.finish_and_clear();
    Ok(Written { dir: dir.display().to_string(), shards: digests.len(), bytes })
}

/// An error met while reading a backup's files as they are sent.
pub type ReadError = std::sync::Arc<std::sync::Mutex<Option<std::io::Error>>>;

/// Bytes of an image per chunk.
const PIECE: usize = 1 << 20;

/// Fills `buf` from `file` as far as the file goes: the bytes read.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The chunks of the backup in `dir`, in the order `Admin.Restore` takes
/// them, read from the files as they are sent. A file that cannot be read
/// ends the stream early and leaves its error in the returned slot (the
/// node then refuses the torn backup; the caller reports the read error).
pub fn read(dir: &Path) -> Result<(impl futures::Stream<Item = pb::BackupChunk>, ReadError)> {
    let manifest_json = std::fs::read_to_string(dir.join("manifest.json")).with_context(|| format!("{} holds no backup", dir.display()))?;
    let digests: BTreeMap<u32, String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("digests.json"))?).context("digests.json")?;
    let mut files = Vec::new();
    for (shard, digest) in digests {
        let path = image_path(dir, shard);
        let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        files.push((shard, digest, file));
    }
    let failed: ReadError = Default::default();
    let first = pb::BackupChunk { manifest_json, ..Default::default() };
    let slot = failed.clone();
    let pieces = futures::stream::iter(files).flat_map(move |(shard, digest, mut file)| {
        let slot = slot.clone();
        let mut done = false;
        futures::stream::iter(std::iter::from_fn(move || {
            if done || slot.lock().map_or(true, |e| e.is_some()) {
                return None;
            }
            let mut data = vec![0u8; PIECE];
            match read_full(&mut file, &mut data) {
                Ok(n) => {
                    data.truncate(n);
                    // The file's end ends the image: its last piece carries the digest.
                    done = n < PIECE;
                    Some(pb::BackupChunk {
                        manifest_json: String::new(),
                        shard,
                        data,
                        digest: if done { digest.clone() } else { String::new() },
                    })
                }
                Err(e) => {
                    if let Ok(mut slot) = slot.lock() {
                        *slot = Some(e);
                    }
                    None
                }
            }
        }))
    });
    Ok((futures::stream::iter([first]).chain(pieces), failed))
}
