//! cgroup v2 limits for allocations (memory.max, cpu.weight) under a cgroup the agent creates,
//! `ROOT/outpost-agent/ALLOCATION`. Used only where ROOT is a writable cgroup2 file system;
//! elsewhere the supervisor reports "cgroup limits unavailable: <why>" and runs without limits.

use std::fs;
use std::path::{Path, PathBuf};

use nix::sys::statfs::{CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, TMPFS_MAGIC, statfs};
use nix::unistd::{AccessFlags, access};

pub const AGENT_CGROUP: &str = "outpost-agent";

/// The agent's cgroup folder.
#[derive(Debug, Clone)]
pub struct CgroupTree {
    base: PathBuf,
}

/// cpu.weight for a CPU request: 100 (the kernel default) per core, within 1..=10000.
pub fn cpu_weight(cpu_millis: u32) -> u64 {
    if cpu_millis == 0 {
        return 100;
    }
    (u64::from(cpu_millis) / 10).clamp(1, 10_000)
}

/// memory.max for a memory request: the bytes, or `max` when none was requested.
pub fn memory_max(memory_bytes: u64) -> String {
    if memory_bytes == 0 {
        "max".to_string()
    } else {
        memory_bytes.to_string()
    }
}

impl CgroupTree {
    /// Checks that `root` is a writable cgroup2 mount and creates the agent's folder. The error
    /// says why limits are unavailable.
    pub fn probe(root: &Path) -> Result<Self, String> {
        let fs = statfs(root).map_err(|e| format!("cannot stat {}: {e}", root.display()))?;
        let kind = fs.filesystem_type();
        if kind != CGROUP2_SUPER_MAGIC {
            let name = match kind {
                TMPFS_MAGIC => " (tmpfs: a cgroup v1 or hybrid host)",
                CGROUP_SUPER_MAGIC => " (cgroup v1)",
                _ => "",
            };
            return Err(format!(
                "{} is not a cgroup2 file system (magic {:#x}{name})",
                root.display(),
                kind.0
            ));
        }
        access(root, AccessFlags::W_OK)
            .map_err(|e| format!("{} is not writable: {e}", root.display()))?;
        // Delegate the controllers down to the agent's folder; the kernel refuses this where the
        // root holds processes directly, which is then reported.
        write_file(&root.join("cgroup.subtree_control"), "+memory +cpu")?;
        let tree = Self::at(root.join(AGENT_CGROUP))?;
        write_file(&tree.base.join("cgroup.subtree_control"), "+memory +cpu")?;
        Ok(tree)
    }

    /// Uses `base` as the agent's folder without checking the file system type. Tests use it on
    /// a plain folder that stands in for cgroupfs.
    pub fn at(base: PathBuf) -> Result<Self, String> {
        fs::create_dir_all(&base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
        Ok(Self { base })
    }

    pub fn allocation_dir(&self, allocation_id: &str) -> PathBuf {
        self.base.join(allocation_id)
    }

    /// Creates the allocation's cgroup and sets its limits; returns its `cgroup.procs` file,
    /// which the process writes its pid to before it execs.
    pub fn prepare(
        &self,
        allocation_id: &str,
        memory_bytes: u64,
        cpu_millis: u32,
    ) -> Result<PathBuf, String> {
        let dir = self.allocation_dir(allocation_id);
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        write_file(&dir.join("memory.max"), &memory_max(memory_bytes))?;
        write_file(&dir.join("cpu.weight"), &cpu_weight(cpu_millis).to_string())?;
        Ok(dir.join("cgroup.procs"))
    }

    /// Removes the allocation's cgroup once its processes are gone (best effort).
    pub fn release(&self, allocation_id: &str) {
        let _ = fs::remove_dir(self.allocation_dir(allocation_id));
    }
}

fn write_file(path: &Path, value: &str) -> Result<(), String> {
    fs::write(path, value).map_err(|e| format!("cannot write {value:?} to {}: {e}", path.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn weight_and_max_follow_the_request() {
        assert_eq!(cpu_weight(0), 100);
        assert_eq!(cpu_weight(1000), 100);
        assert_eq!(cpu_weight(250), 25);
        assert_eq!(cpu_weight(5), 1);
        assert_eq!(cpu_weight(u32::MAX), 10_000);
        assert_eq!(memory_max(0), "max");
        assert_eq!(memory_max(64 << 20), "67108864");
    }

    #[test]
    fn a_plain_folder_is_not_cgroup2_and_the_reason_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let why = CgroupTree::probe(dir.path()).unwrap_err();
        assert!(why.contains("not a cgroup2 file system"), "{why}");
        assert!(why.contains(&dir.path().display().to_string()), "{why}");
    }

    #[test]
    fn limits_are_written_where_cgroupfs_expects_them() {
        // A plain folder standing in for the agent's cgroup2 folder.
        let dir = tempfile::tempdir().unwrap();
        let tree = CgroupTree::at(dir.path().join(AGENT_CGROUP)).unwrap();
        let procs = tree.prepare("web-0", 128 << 20, 500).unwrap();
        let alloc = tree.allocation_dir("web-0");
        assert_eq!(procs, alloc.join("cgroup.procs"));
        assert_eq!(
            fs::read_to_string(alloc.join("memory.max")).unwrap(),
            "134217728"
        );
        assert_eq!(fs::read_to_string(alloc.join("cpu.weight")).unwrap(), "50");
    }
}
