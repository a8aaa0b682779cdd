//! A full disk, for real: a small ext4 image loop-mounted (tmpfs with a size limit where loop
//! devices are not available). Tests that cannot mount say so and skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use kvtier::{IoMode, NvmeConfig, TierConfig, TierEngine, TierError};

struct SmallFs {
    _tmp: tempfile::TempDir,
    mnt: PathBuf,
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

fn run(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn small_fs(mib: u64) -> Option<SmallFs> {
    let tmp = tempfile::tempdir().ok()?;
    let img = tmp.path().join("disk.img");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).ok()?;
    let m = mnt.to_str()?;
    let file = std::fs::File::create(&img).ok()?;
    file.set_len(mib << 20).ok()?;
    let img_s = img.to_str()?;
    if run("mkfs.ext4", &["-q", "-F", img_s]) && run("mount", &["-o", "loop", img_s, m]) {
        return Some(SmallFs { _tmp: tmp, mnt });
    }
    if run(
        "mount",
        &["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs", m],
    ) {
        return Some(SmallFs { _tmp: tmp, mnt });
    }
    eprintln!("SKIP: cannot mount a small file system here (needs root and mount); disk-full test not run");
    None
}

fn free(p: &Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(p)
        .output()
        .expect("df runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df prints a number")
}

#[test]
fn a_store_larger_than_the_disk_is_refused_up_front() {
    let Some(fs) = small_fs(16) else { return };
    let g = geometry();
    let mut cfg = TierConfig::new(g, 4);
    // ~52 KiB slots x 1000 = 52 MiB on a 16 MiB file system.
    cfg.nvme = Some(NvmeConfig::new(&fs.mnt, 1000));
    let err = TierEngine::new(cfg).err().expect("must not fit");
    match &err {
        TierError::NoSpace { need, have, .. } => assert!(need > have, "{err}"),
        other => panic!("expected NoSpace, got {other}"),
    }
    let left: Vec<_> = std::fs::read_dir(&fs.mnt)
        .expect("dir")
        .filter_map(Result::ok)
        // The directory's lock file is no store file: an empty file, held only while open.
        .filter(|e| e.file_name() != "lost+found" && e.file_name() != kvtier::nvme::LOCK_FILE)
        .collect();
    assert!(
        left.is_empty(),
        "no half-made store files are left behind: {left:?}"
    );
}

#[test]
fn writes_into_a_full_disk_fail_cleanly_and_nothing_wrong_is_served() {
    let g = geometry();
    let slot = 4096 + g.block_bytes().div_ceil(4096) * 4096;
    for io in [IoMode::Uring, IoMode::Threads] {
        // A file system per backend: a closed io_uring releases its files asynchronously.
        let Some(fs) = small_fs(8) else { return };
        let fits = free(&fs.mnt) / slot;
        let dir = fs.mnt.join(format!("{io:?}"));
        // A sparse store promising twice what the disk holds.
        let mut n = NvmeConfig::new(&dir, fits * 2 + 16);
        n.preallocate = false;
        n.io = io;
        let mut cfg = TierConfig::new(g, 4);
        cfg.nvme = Some(n);
        let t = TierEngine::new(cfg).expect("sparse store opens");
        let mut src = G1::new(g, 64, 21);
        let s = src.register(&t);
        let total = (fits * 2).min(400) as u32 + 8;
        let blocks: Vec<_> = (0..total).map(|i| (hash(u64::from(i)), i % 64)).collect();
        for chunk in blocks.chunks(16) {
            let c = wait(&t, t.offload(s, chunk).expect("queued"));
            assert!(
                c.all_ok(),
                "offload into DRAM succeeds even when G3 is full: {c:?}"
            );
        }
        let _ = t.flush(WAIT);
        let st = t.stats();
        assert!(
            st.nvme.errors > 0,
            "{io:?}: the disk filled up, writes must have failed: {st:?}"
        );
        t.check_consistent()
            .expect("consistent after failed writes");
        // Whatever the index still claims must come back exact; the rest is a miss.
        let mut dst = G1::new(g, 64, 22);
        let d = dst.register(&t);
        let mut served = 0;
        for chunk in blocks.chunks(64) {
            let targets: Vec<_> = chunk
                .iter()
                .enumerate()
                .map(|(k, b)| (b.0, k as u32))
                .collect();
            let c = wait(&t, t.onboard(d, &targets).expect("queued"));
            for b in &c.blocks {
                let i = blocks.iter().position(|x| x.0 == b.hash).expect("known");
                let pos = targets.iter().position(|x| x.0 == b.hash).expect("asked") as u32;
                match &b.result {
                    Ok(()) => {
                        served += 1;
                        assert_eq!(src.block(blocks[i].1), dst.block(pos), "{io:?} block {i}");
                    }
                    Err(e) => assert!(
                        matches!(e, TierError::Miss(_) | TierError::Slot { .. }),
                        "{e}"
                    ),
                }
            }
        }
        assert!(served > 0);
    }
}
