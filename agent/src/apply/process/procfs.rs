//! Reading `/proc/PID/stat`: the process start time (field 22) that tells our process from a
//! later one that reused its pid, and the state (field 3) that tells a zombie from a live one.

/// What `/proc/PID/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub state: char,
    /// Clock ticks since boot at which the process started.
    pub start_ticks: u64,
}

impl ProcStat {
    /// Alive: present and neither a zombie nor dead.
    pub fn is_alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses the text of `/proc/PID/stat`. Field 2 (comm) may hold spaces and ')', so fields are
/// counted after the last ')'.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let after = text.get(text.rfind(')')? + 1..)?;
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `fields` now starts at field 4; field 22 is 18 further.
    let start_ticks = fields.nth(22 - 4)?.parse().ok()?;
    Some(ProcStat { state, start_ticks })
}

/// Reads `/proc/PID/stat`; `None` when the process does not exist.
pub fn read_stat(pid: i32) -> Option<ProcStat> {
    if pid <= 0 {
        return None;
    }
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The start ticks of a live (non-zombie) process.
pub fn live_start_ticks(pid: i32) -> Option<u64> {
    read_stat(pid)
        .filter(ProcStat::is_alive)
        .map(|stat| stat.start_ticks)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_comm_with_spaces_and_parens() {
        let line = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                state: 'S',
                start_ticks: 987654
            })
        );
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("12 (x) S 1 2"), None);
    }

    #[test]
    fn reads_our_own_process() {
        let stat = read_stat(std::process::id() as i32).unwrap();
        assert!(stat.is_alive());
        assert!(stat.start_ticks > 0);
        assert_eq!(read_stat(-1), None);
    }
}
