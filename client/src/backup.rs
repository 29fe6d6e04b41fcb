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

/// The chunks of the backup in `dir`, in the order `Admin.Restore` takes
/// them, read from the files as they are sent.
pub fn read(dir: &Path) -> Result<impl futures::Stream<Item = pb::BackupChunk>> {
    let manifest_json = std::fs::read_to_string(dir.join("manifest.json")).with_context(|| format!("{} holds no backup", dir.display()))?;
    let digests: BTreeMap<u32, String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("digests.json"))?).context("digests.json")?;
    for shard in digests.keys() {
        if !image_path(dir, *shard).exists() {
            bail!("{} is missing", image_path(dir, *shard).display());
        }
    }
    let first = pb::BackupChunk { manifest_json, ..Default::default() };
    let dir = dir.to_path_buf();
    let pieces = futures::stream::iter(digests).flat_map(move |(shard, digest)| {
        let mut file = std::fs::File::open(image_path(&dir, shard)).ok();
        let mut done = false;
        futures::stream::iter(std::iter::from_fn(move || {
            if done {
                return None;
            }
            let mut data = vec![0u8; 1 << 20];
            let n = file.as_mut().map_or(0, |f| f.read(&mut data).unwrap_or(0));
            data.truncate(n);
            // A short read ends the image: its last piece carries the digest.
            done = n < (1 << 20);
            Some(pb::BackupChunk { manifest_json: String::new(), shard, data, digest: if done { digest.clone() } else { String::new() } })
        }))
    });
    Ok(futures::stream::iter([first]).chain(pieces))
}
