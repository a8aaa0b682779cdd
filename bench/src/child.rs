//! A peer's process driven by lines: commands on its stdin, answers on its stdout (lines that
//! start with `ok`, `err`, `ready` or `READY`; anything else it prints is ignored).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

pub struct LineProc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// What it is, for errors.
    what: String,
}

impl LineProc {
    pub fn spawn(mut cmd: Command, what: &str) -> Result<LineProc, String> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{what}: {e}"))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                let answer = ["ok", "err", "ready", "READY"]
                    .iter()
                    .any(|p| l.starts_with(p));
                if answer && tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(LineProc {
            child,
            stdin: Some(stdin),
            lines,
            what: what.to_string(),
        })
    }

    /// Its next answer (bounded: a peer that hangs fails the run).
    pub fn line(&mut self) -> Result<String, String> {
        self.lines
            .recv_timeout(Duration::from_secs(120))
            .map_err(|_| format!("{} stopped answering", self.what))
    }

    /// Sends `c`, returns the rest of an `ok` answer.
    pub fn ok(&mut self, c: &str) -> Result<String, String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "{c}").map_err(|e| e.to_string())?;
        stdin.flush().map_err(|e| e.to_string())?;
        let l = self.line()?;
        l.strip_prefix("ok")
            .map(|r| r.trim().to_string())
            .ok_or_else(|| format!("{}: `{c}` -> {l}", self.what))
    }
}

impl Drop for LineProc {
    fn drop(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = writeln!(s, "quit");
            let _ = s.flush();
        }
        std::thread::sleep(Duration::from_millis(200));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
