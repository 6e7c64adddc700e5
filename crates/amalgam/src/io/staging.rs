//! Where an output is assembled, and who is writing it.
//!
//! Every output is written into a hidden staging directory beside its target
//! (`.amalgam-tmp-*`) and renamed into place when complete ([`super::writer`]). A run that is
//! killed (SIGKILL, the OOM killer, a power cut) cannot remove its staging directory, so each one
//! carries an owner record ([`MARKER`]: process id, host, start time, target), and the next run
//! into the same target removes the stale ones it finds (owner gone), saying how much it freed;
//! `amalgam clean DIR` does the same for a whole tree ([`clean`]). A live owner's directory is
//! never touched, nor one without a record (an older amalgam's, or not amalgam's at all).
//!
//! Two runs into one target would race to rename their outputs into place, so the first holds
//! an exclusive lock ([`TargetLock`]: `flock` on a hidden file beside the target, released when
//! the process ends however it ends) and a second is refused with the first one's process id.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Prefix of staging directories.
pub const STAGING_PREFIX: &str = ".amalgam-tmp-";
/// The owner record inside a staging directory (removed before the directory is installed).
pub const MARKER: &str = ".amalgam-staging.json";
/// Prefix of target lock files.
const LOCK_PREFIX: &str = ".amalgam-lock-";

/// Who is writing a staging directory or holds a lock.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    /// Process id.
    pub pid: u32,
    /// Host name.
    pub host: String,
    /// Start, in seconds since the Unix epoch.
    pub started: u64,
    /// The output being written.
    pub target: PathBuf,
}

impl Owner {
    /// This process, writing `target`.
    pub fn me(target: &Path) -> Owner {
        Owner {
            pid: std::process::id(),
            host: host_name(),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            target: absolute(target),
        }
    }

    /// Whether the owner is known to be gone: on this host, and no process has its id. (An id
    /// taken again by another process counts as alive: such a directory is left alone.)
    pub fn is_gone(&self) -> bool {
        self.host == host_name() && !process_alive(self.pid)
    }
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates what fits.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    }
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return true;
    }
    std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// `path` made absolute (against the working directory), without resolving links.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Write `owner`'s record into staging directory `dir`: whole or not at all (written beside, then
/// renamed), so a reader never sees a partial record.
pub fn mark(dir: &Path, owner: &Owner) -> Result<()> {
    let path = dir.join(MARKER);
    let part = dir.join(format!("{MARKER}.part"));
    let text = serde_json::to_string(owner).expect("json");
    std::fs::write(&part, text).at(&part)?;
    std::fs::rename(&part, &path).at(&path)
}

/// The owner record of staging directory `dir`, if it has a readable one.
pub fn owner_of(dir: &Path) -> Option<Owner> {
    let text = std::fs::read_to_string(dir.join(MARKER)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Bytes under `path` (files' lengths; links not followed).
pub fn tree_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|rd| rd.flatten().map(|e| tree_bytes(&e.path())).sum())
        .unwrap_or(0)
}

/// A staging directory that was removed, or found and left alone.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Found {
    /// The directory.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its owner record, if it has one.
    pub owner: Option<Owner>,
    /// Whether it was (or, in a dry run, would be) removed: its owner is gone.
    pub stale: bool,
}

/// The staging directories directly in `parent` (those whose owner record names `target`,
/// when given), each with whether its owner is gone. Removes the stale ones unless `dry_run`.
pub fn sweep(parent: &Path, target: Option<&Path>, dry_run: bool) -> Vec<Found> {
    let target = target.map(absolute);
    let Ok(rd) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || !name.to_string_lossy().starts_with(STAGING_PREFIX) {
            continue;
        }
        let path = entry.path();
        let owner = owner_of(&path);
        if let (Some(t), Some(o)) = (&target, &owner)
            && &o.target != t
        {
            continue;
        }
        if target.is_some() && owner.is_none() {
            continue;
        }
        let stale = owner.as_ref().is_some_and(Owner::is_gone);
        let bytes = tree_bytes(&path);
        if stale && !dry_run && std::fs::remove_dir_all(&path).is_err() {
            continue;
        }
        found.push(Found {
            path,
            bytes,
            owner,
            stale,
        });
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// Every staging directory under `root` (not looking inside staging directories themselves;
/// links not followed), the stale ones removed unless `dry_run`.
pub fn clean(root: &Path, dry_run: bool) -> Result<Vec<Found>> {
    let meta = std::fs::metadata(root).at(root)?;
    if !meta.is_dir() {
        return Err(Error::Output {
            path: root.to_path_buf(),
            reason: "is not a directory; give the directory to clean".into(),
        });
    }
    let mut out = sweep(root, None, dry_run);
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .at(root)?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| !e.file_name().to_string_lossy().starts_with(STAGING_PREFIX))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    for d in dirs {
        // Unreadable subdirectories are skipped, not an error for the whole tree.
        if let Ok(found) = clean(&d, dry_run) {
            out.extend(found);
        }
    }
    Ok(out)
}

/// An exclusive lock on an output path, held until dropped (or the process ends).
#[derive(Debug)]
pub struct TargetLock {
    file: File,
    path: PathBuf,
}

impl TargetLock {
    /// Lock `target` (its lock file is `.amalgam-lock-NAME` in `parent`), or say who holds it.
    pub fn acquire(target: &Path, parent: &Path) -> Result<TargetLock> {
        let name = target
            .file_name()
            .map_or_else(|| "output".into(), |n| n.to_string_lossy().into_owned());
        let path = parent.join(format!("{LOCK_PREFIX}{name}"));
        loop {
            let mut file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::Output {
                    path: target.to_path_buf(),
                    reason: format!(
                        "cannot write in {} ({e}); write the output where you may create files",
                        parent.display()
                    ),
                })?;
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(Error::Output {
                        path: path.clone(),
                        reason: format!("cannot lock the output: {err}"),
                    });
                }
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let who = serde_json::from_str::<Owner>(&text).map_or_else(
                    |_| "another amalgam process".to_string(),
                    |o| format!("amalgam process {} on {}", o.pid, o.host),
                );
                return Err(Error::Output {
                    path: target.to_path_buf(),
                    reason: format!(
                        "{who} is writing this output now; wait for it to finish, stop it, or write elsewhere"
                    ),
                });
            }
            // The holder before us may have removed the file after we opened it: then our lock
            // is on a file nobody else will open; take the one at the path again.
            let same = std::fs::metadata(&path)
                .ok()
                .zip(file.metadata().ok())
                .is_some_and(|(a, b)| a.ino() == b.ino() && a.dev() == b.dev());
            if !same {
                continue;
            }
            let record = serde_json::to_string(&Owner::me(target)).expect("json");
            file.set_len(0).at(&path)?;
            file.rewind().at(&path)?;
            file.write_all(record.as_bytes()).at(&path)?;
            return Ok(TargetLock { file, path });
        }
    }
}

impl Drop for TargetLock {
    fn drop(&mut self) {
        // Removed while still locked, so that no one locks the old file after this.
        let _ = std::fs::remove_file(&self.path);
        // SAFETY: unlocking a descriptor this value owns (closing it would unlock too).
        unsafe {
            libc::flock(self.file.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The id of a process that has ended.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn stale_directories_of_the_target_are_removed_and_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("out");
        let mk = |name: &str, owner: Option<Owner>| {
            let dir = d.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("model.safetensors"), vec![0u8; 1000]).unwrap();
            if let Some(o) = owner {
                mark(&dir, &o).unwrap();
            }
            dir
        };
        let dead = Owner {
            pid: dead_pid(),
            ..Owner::me(&target)
        };
        let stale = mk(".amalgam-tmp-a", Some(dead.clone()));
        let live = mk(".amalgam-tmp-b", Some(Owner::me(&target)));
        let other = mk(
            ".amalgam-tmp-c",
            Some(Owner {
                target: d.path().join("elsewhere"),
                ..dead.clone()
            }),
        );
        let unmarked = mk(".amalgam-tmp-d", None);
        let remote = mk(
            ".amalgam-tmp-e",
            Some(Owner {
                host: "another-host".into(),
                ..dead
            }),
        );
        let found = sweep(d.path(), Some(&target), false);
        let stale_found: Vec<_> = found.iter().filter(|f| f.stale).collect();
        assert_eq!(stale_found.len(), 1);
        assert_eq!(stale_found[0].path, stale);
        assert!(stale_found[0].bytes >= 1000);
        assert!(!stale.exists());
        for kept in [&live, &other, &unmarked, &remote] {
            assert!(kept.exists(), "{}", kept.display());
        }
        // A tree-wide clean also takes the other target's stale directory, not the rest.
        let all = clean(d.path(), true).unwrap();
        assert_eq!(all.iter().filter(|f| f.stale).count(), 1);
        assert!(other.exists(), "dry run");
        clean(d.path(), false).unwrap();
        assert!(!other.exists());
        for kept in [&live, &unmarked, &remote] {
            assert!(kept.exists(), "{}", kept.display());
        }
    }

    #[test]
    fn a_second_lock_on_one_target_is_refused_naming_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("out");
        let first = TargetLock::acquire(&target, d.path()).unwrap();
        let err = TargetLock::acquire(&target, d.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("amalgam process {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains("is writing this output now"), "{err}");
        drop(first);
        let again = TargetLock::acquire(&target, d.path()).unwrap();
        drop(again);
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            0,
            "lock file removed"
        );
    }
}
