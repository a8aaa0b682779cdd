//! G3 namespaces: which blocks a directory of slot files may hand back. A block hash names
//! tokens, not the model that computed their KV (vLLM's default hash seed is the same in every
//! process and for every model), so the directory and every slot's fingerprint carry the
//! identity of what wrote them: a new checkpoint, another dtype, another TP rank gets its own
//! subdirectory and fingerprint, and a slot from elsewhere fails verification instead of being
//! served. An epoch, bumped by a reset, retires every slot written before it.

use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use crate::error::TierError;

const NAMESPACE_FILE: &str = "NAMESPACE";
const EPOCH_FILE: &str = "EPOCH";

/// The longest identity accepted (it is written next to the slots for operators to read).
const MAX_IDENTITY: usize = 64 << 10;

/// The subdirectory of `root` for `identity`, created with a `NAMESPACE` file that spells the
/// identity out.
pub fn dir_for(root: &Path, identity: &str) -> Result<PathBuf, TierError> {
    if identity.is_empty() || identity.len() > MAX_IDENTITY {
        return Err(TierError::Config(format!(
            "a G3 namespace is 1 to {MAX_IDENTITY} bytes, not {}",
            identity.len()
        )));
    }
    let dir = root.join(format!("ns-{:016x}", xxh3_64(identity.as_bytes())));
    std::fs::create_dir_all(&dir).map_err(|e| TierError::io("create", &dir, e))?;
    let file = dir.join(NAMESPACE_FILE);
    match std::fs::read_to_string(&file) {
        Ok(existing) if existing == identity => {}
        Ok(existing) => {
            return Err(TierError::Config(format!(
                "{} holds namespace {existing:?}, not {identity:?} (a 64-bit hash collision); \
                 use another nvme_dir",
                dir.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_atomically(&file, identity.as_bytes())?;
        }
        Err(e) => return Err(TierError::io("read", &file, e)),
    }
    Ok(dir)
}

/// The fingerprint every slot of this identity and epoch carries. With neither (a bare
/// directory, never reset) it is the geometry's alone, as before namespaces existed.
pub fn fingerprint(base: u64, identity: Option<&str>, epoch: u64) -> u64 {
    if identity.is_none() && epoch == 0 {
        return base;
    }
    let mut b = Vec::with_capacity(identity.map_or(0, str::len) + 16);
    b.extend_from_slice(&base.to_le_bytes());
    b.extend_from_slice(&epoch.to_le_bytes());
    b.extend_from_slice(identity.unwrap_or("").as_bytes());
    // Never the bare geometry's value, so a namespaced store never accepts an old bare slot.
    xxh3_64(&b) | 1 << 63
}

pub fn read_epoch(dir: &Path) -> Result<u64, TierError> {
    let file = dir.join(EPOCH_FILE);
    match std::fs::read_to_string(&file) {
        Ok(s) => s.trim().parse().map_err(|_| {
            TierError::Config(format!("{} does not hold an epoch: {s:?}", file.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(TierError::io("read", &file, e)),
    }
}

pub fn write_epoch(dir: &Path, epoch: u64) -> Result<(), TierError> {
    write_atomically(&dir.join(EPOCH_FILE), epoch.to_string().as_bytes())
}

/// Write to a temporary file, fsync, rename: a crash leaves the old contents or the new.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), TierError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| TierError::io("create", &tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| TierError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TierError::io("rename", path, e))?;
    // The rename is durable only once the directory is.
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| TierError::io("sync", dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_and_epochs_separate_fingerprints_and_directories() {
        let base = 42;
        assert_eq!(fingerprint(base, None, 0), base);
        let a = fingerprint(base, Some("llama@rev1 tp0/2"), 0);
        let b = fingerprint(base, Some("llama@rev1 tp1/2"), 0);
        assert_ne!(a, b);
        assert_ne!(a, fingerprint(base, Some("llama@rev1 tp0/2"), 1));
        assert_ne!(fingerprint(base, None, 1), base);
        let root = tempfile::tempdir().expect("tempdir");
        let d1 = dir_for(root.path(), "m1").expect("dir");
        let d2 = dir_for(root.path(), "m2").expect("dir");
        assert_ne!(d1, d2);
        assert_eq!(dir_for(root.path(), "m1").expect("again"), d1);
        assert_eq!(read_epoch(&d1).expect("epoch"), 0);
        write_epoch(&d1, 7).expect("write");
        assert_eq!(read_epoch(&d1).expect("epoch"), 7);
        assert!(dir_for(root.path(), "").is_err());
    }
}
