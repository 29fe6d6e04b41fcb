//! A Raft snapshot image as a file: its format, and the handle openraft
//! reads it through ([`ImageData`], the group's `SnapshotData`).
//!
//! Format: the MessagePack of [`SnapshotImage`], a list of two: the
//! snapshot's metadata, then the shard's records as one byte string (what
//! `FrozenImage::write_to` wrote). A new image writes the byte string's
//! header in its longest form (`bin32`), with its length filled in once the
//! records are written, so an image is written as the records are read,
//! and never held in memory. Any MessagePack reader, older builds' included,
//! reads it as the same `SnapshotImage`. Images of older builds (the
//! records as a list of integers, or fields by name) read too, whole.
//!
//! An image's records must fit a `bin32`: 4 GiB per shard.

use super::{decode, encode, StorageError};
use crate::storage::{io_error, FrozenImage, ImageFile, PartialImage, StoreError};
use openraft::{BasicNode, SnapshotMeta};
use serde::{Deserialize, Serialize};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

/// What a snapshot carries besides the graph (the file's format).
#[derive(Serialize, Deserialize)]
pub(super) struct SnapshotImage {
    pub(super) meta: SnapshotMeta<u64, BasicNode>,
    /// Written as a MessagePack byte string (`bin`). Builds before wrote
    /// serde's form of a `Vec<u8>`, a list of integers in which each byte of
    /// 128 or more takes two; rmp-serde reads either form into a `Vec<u8>`
    /// (test `a_snapshot_image_reads_back_with_its_graph_as_integers_or_bytes`),
    /// so followers on those builds install these images too.
    #[serde(serialize_with = "as_byte_string")]
    pub(super) graph: Vec<u8>,
}

fn as_byte_string<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(bytes)
}

/// MessagePack markers: a list of two, a byte string with a 1-, 2- or
/// 4-byte length.
const LIST_OF_TWO: u8 = 0x92;
const BIN8: u8 = 0xc4;
const BIN16: u8 = 0xc5;
const BIN32: u8 = 0xc6;

fn read_err(e: std::io::Error) -> StoreError {
    io_error("cannot read a snapshot image", e)
}

fn corrupt(reason: String) -> StoreError {
    StoreError::Corrupt { key: "snapshot image".into(), reason }
}

/// Writes `records` into `partial`, labelled `meta`.
pub(super) fn write_image(
    records: &dyn FrozenImage,
    meta: &SnapshotMeta<u64, BasicNode>,
    partial: &mut PartialImage,
) -> Result<(), StoreError> {
    let mut out = BufWriter::with_capacity(1 << 20, partial.file());
    let mut head = vec![LIST_OF_TWO];
    head.extend(encode(meta));
    let length_at = head.len() as u64 + 1;
    head.extend([BIN32, 0, 0, 0, 0]);
    let write_err = |e| io_error("cannot write a snapshot image", e);
    out.write_all(&head).map_err(write_err)?;
    records.write_to(&mut out)?;
    let end = out.stream_position().map_err(write_err)?;
    let length = u32::try_from(end - head.len() as u64)
        .map_err(|_| StoreError::Io("a shard's records take more than 4 GiB: too large for one snapshot image".into()))?;
    crate::crash::crash_point("raft::mid-snapshot");
    out.seek(SeekFrom::Start(length_at)).map_err(write_err)?;
    out.write_all(&length.to_be_bytes()).map_err(write_err)?;
    out.flush().map_err(write_err)
}

/// An image's metadata and where its records are.
enum Records {
    /// A byte string of this length follows.
    Bytes(u64),
    /// An older build's form: the whole image must be decoded.
    Other,
}

fn read_head<R: Read>(r: &mut R) -> Result<(Option<SnapshotMeta<u64, BasicNode>>, Records), StoreError> {
    let mut marker = [0u8; 1];
    r.read_exact(&mut marker).map_err(|e| corrupt(format!("no header: {e}")))?;
    if marker[0] != LIST_OF_TWO {
        return Ok((None, Records::Other));
    }
    let meta: SnapshotMeta<u64, BasicNode> = rmp_serde::from_read(&mut *r).map_err(|e| corrupt(format!("metadata: {e}")))?;
    r.read_exact(&mut marker).map_err(|e| corrupt(format!("no records: {e}")))?;
    let width = match marker[0] {
        BIN8 => 1,
        BIN16 => 2,
        BIN32 => 4,
        _ => return Ok((Some(meta), Records::Other)),
    };
    let mut len = [0u8; 8];
    r.read_exact(&mut len[8 - width..]).map_err(|e| corrupt(format!("no length of records: {e}")))?;
    Ok((Some(meta), Records::Bytes(u64::from_be_bytes(len))))
}

fn read_whole(file: &mut std::fs::File) -> Result<SnapshotImage, StoreError> {
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(read_err)?;
    decode(&bytes)
}

/// The metadata of the image in `file`.
pub(super) fn read_meta(file: &mut std::fs::File) -> Result<SnapshotMeta<u64, BasicNode>, StoreError> {
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    match read_head(&mut BufReader::new(&mut *file))? {
        (Some(meta), _) => Ok(meta),
        (None, _) => Ok(read_whole(file)?.meta),
    }
}

/// The whole image in `file`, its records read into memory (a restore
/// needs them whole).
pub(super) fn read_image(file: &mut std::fs::File) -> Result<SnapshotImage, StoreError> {
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let mut r = BufReader::new(&mut *file);
    match read_head(&mut r)? {
        (Some(meta), Records::Bytes(len)) => {
            if len > size {
                return Err(corrupt(format!("{len} bytes of records in a file of {size}")));
            }
            let mut graph = vec![0u8; len as usize];
            r.read_exact(&mut graph).map_err(|e| corrupt(format!("records cut short: {e}")))?;
            Ok(SnapshotImage { meta, graph })
        }
        _ => {
            drop(r);
            read_whole(file)
        }
    }
}

/// A group's snapshot data, as openraft reads and writes it: a file, sent
/// to followers in chunks and received in chunks. One received (or built)
/// and not yet kept is a partial image, deleted if dropped.
pub struct ImageData {
    file: tokio::fs::File,
    partial: Option<tempfile::TempPath>,
}

impl ImageData {
    /// The kept image, for reading.
    pub(super) fn kept(file: std::fs::File) -> ImageData {
        ImageData { file: tokio::fs::File::from_std(file), partial: None }
    }

    /// A new partial image, for receiving.
    pub(super) fn receiving(partial: PartialImage) -> ImageData {
        let (file, path) = partial.into_parts();
        ImageData { file: tokio::fs::File::from_std(file), partial: Some(path) }
    }

    /// The image as a partial image of `image`: the received file itself,
    /// or a copy of one handed over whole (a test's, another replica's).
    pub(super) async fn into_partial(self, image: &ImageFile) -> Result<PartialImage, StorageError> {
        let ImageData { file, partial } = self;
        let mut file = file.into_std().await;
        let read =
            |e: std::io::Error| -> StorageError { openraft::StorageIOError::read_snapshot(None, openraft::AnyError::new(&e)).into() };
        match partial {
            Some(path) => Ok(PartialImage::join(file, path)),
            None => {
                let mut copy = image.partial().map_err(super::write_err)?;
                file.seek(SeekFrom::Start(0)).map_err(read)?;
                std::io::copy(&mut file, copy.file()).map_err(|e| super::write_err(copy.write_err(e)))?;
                Ok(copy)
            }
        }
    }
}

impl tokio::io::AsyncRead for ImageData {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ImageData {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.file).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl tokio::io::AsyncSeek for ImageData {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{GraphRead, MemStore};
    use idgraph_core::model::{Change, ChangeSet, GroupId, Identifier};

    fn meta_at(index: u64) -> SnapshotMeta<u64, BasicNode> {
        SnapshotMeta {
            last_log_id: Some(openraft::LogId::new(openraft::CommittedLeaderId::new(3, 1), index)),
            snapshot_id: format!("s{index}"),
            ..Default::default()
        }
    }

    fn file_of(bytes: &[u8]) -> (tempfile::TempDir, std::fs::File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        std::fs::write(&path, bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        (dir, file)
    }

    /// A snapshot image is written with its graph as a byte string, smaller
    /// than the list of integers that builds before wrote. A reader like
    /// theirs (a plain `Vec<u8>`) reads it, and this build reads theirs, in
    /// the compact and the named form, from memory and from a file.
    #[test]
    fn a_snapshot_image_reads_back_with_its_graph_as_integers_or_bytes() {
        #[derive(Serialize, Deserialize)]
        struct EarlierImage {
            meta: SnapshotMeta<u64, BasicNode>,
            graph: Vec<u8>,
        }
        let graph: Vec<u8> = (0..=255u8).chain([0x93, 0xc4, 0xff, 0]).collect();
        let meta = meta_at(42);
        let now = encode(&SnapshotImage { meta: meta.clone(), graph: graph.clone() });
        let earlier = encode(&EarlierImage { meta: meta.clone(), graph: graph.clone() });
        let earlier_named = crate::storage::encode(&EarlierImage { meta: meta.clone(), graph: graph.clone() });
        assert!(now.len() * 4 < earlier.len() * 3, "{} bytes as a byte string, {} as integers", now.len(), earlier.len());
        for (form, bytes) in [("byte string", &now), ("integers", &earlier), ("named, integers", &earlier_named)] {
            let img: SnapshotImage = decode(bytes).unwrap_or_else(|e| panic!("{form}: {e}"));
            assert_eq!(img.graph, graph, "{form}");
            assert_eq!(img.meta.last_log_id, meta.last_log_id, "{form}");
            let (_dir, mut file) = file_of(bytes);
            assert_eq!(read_meta(&mut file).unwrap(), meta, "{form}, from a file");
            let img = read_image(&mut file).unwrap_or_else(|e| panic!("{form}, from a file: {e}"));
            assert_eq!((img.meta, img.graph), (meta.clone(), graph.clone()), "{form}, from a file");
        }
        let by_earlier: EarlierImage = decode(&now).expect("a reader of earlier builds reads the byte string");
        assert_eq!(by_earlier.graph, graph);
    }

    /// An image written into a file as the records are read is the
    /// `SnapshotImage` of those records for any MessagePack reader (an
    /// earlier build's follower decodes it whole), and restores them.
    #[test]
    fn an_image_written_into_a_file_reads_as_the_records_it_was_written_from() {
        let store = MemStore::new();
        let mut cs = ChangeSet::default();
        for i in 0..300 {
            cs.push(Change::PutOwner(Identifier::new("email", format!("p{i}@shop.com")), format!("p_{i}")));
        }
        cs.push(Change::PutMeta("raft.snapshot".into(), b"an older image".to_vec()));
        crate::storage::GraphStore::apply(&store, &cs).unwrap();
        let data = tempfile::tempdir().unwrap();
        let image = ImageFile::of(&ImageFile::open_dir(data.path()).unwrap(), GroupId::Meta);
        let mut partial = image.partial().unwrap();
        let frozen = crate::storage::GraphStore::frozen(&store, &["raft.snapshot"]).unwrap();
        write_image(&*frozen, &meta_at(7), &mut partial).unwrap();
        image.keep(partial).unwrap();
        let bytes = std::fs::read(image.path()).unwrap();
        let whole: SnapshotImage = decode(&bytes).unwrap();
        assert_eq!(whole.meta, meta_at(7));
        assert_eq!(whole.graph, crate::storage::GraphStore::snapshot(&store, &["raft.snapshot"]).unwrap());
        let mut file = image.open().unwrap().unwrap();
        assert_eq!(read_meta(&mut file).unwrap(), meta_at(7));
        let img = read_image(&mut file).unwrap();
        let restored = MemStore::new();
        crate::storage::GraphStore::restore(&restored, &img.graph).unwrap();
        assert_eq!(restored.owner(&Identifier::new("email", "p299@shop.com")).unwrap().as_deref(), Some("p_299"));
        assert_eq!(restored.meta("raft.snapshot").unwrap(), None, "the meta value left out is not in the image");
        // Cut short, it is refused, not read as fewer records.
        let (_dir, mut cut) = file_of(&bytes[..bytes.len() - 3]);
        assert!(read_image(&mut cut).is_err());
    }
}
