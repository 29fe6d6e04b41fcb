//! A shard replica's kept Raft snapshot image, in a file of its own:
//! `<data-dir>/snapshots/shard-NNNN.image` (`shard-meta.image` for the
//! metadata group).
//!
//! The image is as large as the shard's graph. Kept as a sled value it was
//! built whole in memory, copied into sled's cache and log, and read whole
//! again each time a follower needed it. As a file it is written as the
//! records are read, sent to followers chunk by chunk from the file, and
//! received chunk by chunk into a file.
//!
//! Rules:
//! - an image is first written to a *partial* file in the same directory
//!   (a random name ending in `.partial`), then fsync'd, renamed over the
//!   kept one and the directory fsync'd: a crash leaves the old image or
//!   the new one, never half of one;
//! - a partial file dropped without being kept is deleted; those a crash
//!   left behind are deleted when the directory is opened
//!   ([`ImageFile::open_dir`]);
//! - a reader holding the kept file open reads the image it opened, even
//!   if a newer one replaces it meanwhile (a rename does not change an open
//!   file).

use super::{io_error, StoreError};
use idgraph_core::model::GroupId;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

const PARTIAL: &str = ".partial";

/// Where one replica keeps its snapshot image.
#[derive(Clone, Debug)]
pub struct ImageFile {
    path: PathBuf,
}

/// An image being written or received, deleted when dropped unless it is
/// kept ([`ImageFile::keep`]).
pub struct PartialImage {
    file: File,
    path: tempfile::TempPath,
}

fn file_err(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    io_error(format_args!("cannot {what} {}", path.display()), e)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| file_err("sync directory", dir, e))
}

impl ImageFile {
    /// The directory of a data directory's images, created if missing, with
    /// the partial images a crash left deleted.
    pub fn open_dir(data_dir: &Path) -> Result<PathBuf, StoreError> {
        let dir = Self::dir(data_dir);
        std::fs::create_dir_all(&dir).map_err(|e| file_err("create", &dir, e))?;
        let entries = std::fs::read_dir(&dir).map_err(|e| file_err("list", &dir, e))?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().ends_with(PARTIAL) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|e| file_err("remove", &path, e))?;
                tracing::info!(path = %path.display(), "removed a snapshot image left half-written");
            }
        }
        Ok(dir)
    }

    /// The directory of a data directory's images.
    pub fn dir(data_dir: &Path) -> PathBuf {
        data_dir.join("snapshots")
    }

    /// Group `group`'s image in `dir` (see [`Self::open_dir`]).
    pub fn of(dir: &Path, group: GroupId) -> ImageFile {
        ImageFile { path: dir.join(format!("shard-{group}.image")) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of the kept image (0 when there is none).
    pub fn bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// The kept image, open for reading; `None` when there is none.
    pub fn open(&self) -> Result<Option<File>, StoreError> {
        match File::open(&self.path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(file_err("open", &self.path, e)),
        }
    }

    /// A new, empty partial image beside the kept one.
    pub fn partial(&self) -> Result<PartialImage, StoreError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let name = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let (file, path) = tempfile::Builder::new()
            .prefix(&format!("{name}."))
            .suffix(PARTIAL)
            .tempfile_in(dir)
            .map_err(|e| file_err("create a partial image in", dir, e))?
            .into_parts();
        Ok(PartialImage { file, path })
    }

    /// Makes `partial` the kept image, durably (see the module's rules).
    pub fn keep(&self, partial: PartialImage) -> Result<(), StoreError> {
        let PartialImage { file, path } = partial;
        file.sync_all().map_err(|e| file_err("sync", &path, e))?;
        drop(file);
        path.persist(&self.path).map_err(|e| file_err("rename a partial image to", &self.path, e.error))?;
        sync_dir(self.path.parent().unwrap_or(Path::new(".")))
    }

    /// Keeps `bytes` as the image (an image kept by an older build in sled).
    pub fn keep_bytes(&self, bytes: &[u8]) -> Result<(), StoreError> {
        let mut partial = self.partial()?;
        partial.file.write_all(bytes).map_err(|e| file_err("write", &partial.path, e))?;
        self.keep(partial)
    }

    /// Deletes the kept image, durably (the replica is discarded).
    pub fn remove(&self) -> Result<(), StoreError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => sync_dir(self.path.parent().unwrap_or(Path::new("."))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(file_err("remove", &self.path, e)),
        }
    }
}

impl PartialImage {
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Splits it for async writing; [`Self::join`] puts it back together.
    pub fn into_parts(self) -> (File, tempfile::TempPath) {
        (self.file, self.path)
    }

    pub fn join(file: File, path: tempfile::TempPath) -> PartialImage {
        PartialImage { file, path }
    }

    /// Maps a write error of this file.
    pub fn write_err(&self, e: std::io::Error) -> StoreError {
        file_err("write", &self.path, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idgraph_core::model::ShardId;
    use std::io::Read;

    fn read(image: &ImageFile) -> Option<Vec<u8>> {
        image.open().unwrap().map(|mut f| {
            let mut out = Vec::new();
            f.read_to_end(&mut out).unwrap();
            out
        })
    }

    #[test]
    fn a_kept_image_replaces_the_last_and_a_dropped_partial_leaves_nothing() {
        let data = tempfile::tempdir().unwrap();
        let dir = ImageFile::open_dir(data.path()).unwrap();
        let image = ImageFile::of(&dir, GroupId::Shard(ShardId(3)));
        assert_eq!(read(&image), None);
        assert_eq!(image.bytes(), 0);
        image.keep_bytes(b"first").unwrap();
        let mut opened = image.open().unwrap().unwrap();
        image.keep_bytes(b"second image").unwrap();
        assert_eq!(read(&image).as_deref(), Some(&b"second image"[..]));
        assert_eq!(image.bytes(), 12);
        let mut old = Vec::new();
        opened.read_to_end(&mut old).unwrap();
        assert_eq!(old, b"first", "a reader keeps the image it opened");

        let mut partial = image.partial().unwrap();
        partial.file().write_all(b"never kept").unwrap();
        drop(partial);
        let names: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec!["shard-0003.image".to_string()], "a dropped partial image is deleted");
        image.remove().unwrap();
        assert_eq!(read(&image), None);
        image.remove().unwrap();
    }

    #[test]
    fn partial_images_a_crash_left_are_deleted_when_the_directory_opens() {
        let data = tempfile::tempdir().unwrap();
        let dir = ImageFile::open_dir(data.path()).unwrap();
        let image = ImageFile::of(&dir, GroupId::Meta);
        image.keep_bytes(b"kept").unwrap();
        let (_, path) = image.partial().unwrap().into_parts();
        let left = path.keep().unwrap();
        assert!(left.exists());
        ImageFile::open_dir(data.path()).unwrap();
        assert!(!left.exists(), "the partial image is gone");
        assert_eq!(read(&image).as_deref(), Some(&b"kept"[..]), "the kept one stays");
    }
}
