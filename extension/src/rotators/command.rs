//! `command:<program>` rotators, for secrets that are not database passwords (an API key of a
//! payment or messaging provider). The program lives directly in `pg_secrets.rotator_dir` and
//! is called once per step as `<program> <step> <secret name> <pending version id>`, with
//! `{"step", "secret_name", "version_id", "current", "pending"}` as JSON on standard input.
//! At the create step it prints the new value; at finish it may revoke the old one.
//!
//! Its standard error is discarded and its output is never logged: either may hold a value.

use super::{Step, StepContext};
use crate::errors::{Error, Result};
use crate::settings;
use crate::validate::MAX_VALUE_BYTES;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// The program's path, which must stay inside the rotator directory.
pub fn resolve(program: &str) -> Result<PathBuf> {
    let invalid = |why: &str| {
        Error::InvalidParameter(format!(
            "rotator program \"{program}\" cannot be used: {why}"
        ))
    };
    let dir =
        settings::rotator_dir().ok_or_else(|| invalid("pg_secrets.rotator_dir is not set"))?;
    let plain_name = !program.is_empty()
        && !program.starts_with('.')
        && program
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !plain_name {
        return Err(invalid(
            "a program is named by a file name of letters, digits, '_', '.' and '-'",
        ));
    }
    let dir = std::fs::canonicalize(&dir)
        .map_err(|_| invalid("pg_secrets.rotator_dir does not exist"))?;
    // Symbolic links are followed, then the result must still be inside the directory.
    let path = std::fs::canonicalize(dir.join(program))
        .map_err(|_| invalid("no such program in pg_secrets.rotator_dir"))?;
    if path.parent() != Some(dir.as_path()) {
        return Err(invalid(
            "it resolves to a file outside pg_secrets.rotator_dir",
        ));
    }
    use std::os::unix::fs::PermissionsExt;
    let executable = std::fs::metadata(&path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false);
    if !executable {
        return Err(invalid("it is not an executable file"));
    }
    Ok(path)
}

/// The secret's name is the program's second argument, and a program that parses options
/// would read one starting with '-' as an option (getopt moves options found anywhere to the
/// front), so such a secret is not rotated by a program.
pub fn check_name(secret_name: &str) -> std::result::Result<(), String> {
    match secret_name.starts_with('-') {
        true => Err(
            "a secret name starting with '-' is not passed to a rotator program, \
                     which would read it as an option"
                .into(),
        ),
        false => Ok(()),
    }
}

#[derive(serde::Serialize)]
struct Input<'a> {
    step: &'a str,
    secret_name: &'a str,
    version_id: String,
    current: Option<&'a str>,
    pending: Option<&'a str>,
}

/// The program, leading a process group of its own: when it exits, and when the step is
/// abandoned (timeout, query cancel, shutdown), the whole group is killed, so neither the
/// program nor anything it left in the background (a job still holding its output, which
/// would keep the step waiting) outlives the step.
struct Running(Child);

impl Running {
    fn kill_group(&self) {
        if let Ok(group) = i32::try_from(self.0.id()) {
            // SAFETY: kill(2) of the group the program leads (`process_group(0)`); called
            // while the program is running or just after it exited, before its id can be
            // reused for a group.
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.kill_group();
            let _ = self.0.wait();
        }
    }
}

/// Runs one step; returns what the program printed (the new value, at create).
pub fn run(program: &str, step: Step, context: &StepContext) -> Result<Zeroizing<Vec<u8>>> {
    check_name(context.secret_name).map_err(|why| context.failed(step, why))?;
    let failed = |why: String| context.failed(step, format!("program \"{program}\" {why}"));
    let path = resolve(program)?;
    fn as_text(value: Option<&[u8]>) -> std::result::Result<Option<&str>, std::str::Utf8Error> {
        value.map(std::str::from_utf8).transpose()
    }
    let binary = |_| failed("cannot rotate a binary value".into());
    let version_id = context
        .pending_version
        .map(|id| id.to_string())
        .unwrap_or_default();
    let input = Zeroizing::new(
        serde_json::to_vec(&Input {
            step: step.as_str(),
            secret_name: context.secret_name,
            version_id: version_id.clone(),
            current: as_text(context.current).map_err(binary)?,
            pending: as_text(context.pending).map_err(binary)?,
        })
        .expect("plain JSON serializes"),
    );
    let mut running = Running(
        Command::new(&path)
            .args([step.as_str(), context.secret_name, &version_id])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|error| failed(format!("cannot start: {}", error.kind())))?,
    );
    // Pipes are fed and drained by threads, so a program that writes before reading, or
    // prints a lot, cannot deadlock against us. The threads touch no PostgreSQL state, and
    // end when the pipes close, at the latest when the program's group is killed; nothing
    // waits for the feeder.
    let mut stdin = running.0.stdin.take().expect("piped");
    let no_thread =
        |error: std::io::Error| failed(format!("cannot start a thread: {}", error.kind()));
    crate::threads::spawn(move || {
        let _ = stdin.write_all(&input);
    })
    .map_err(no_thread)?;
    let mut stdout = running.0.stdout.take().expect("piped");
    let (output_sender, output_receiver) = std::sync::mpsc::channel();
    crate::threads::spawn(move || {
        let mut output = Zeroizing::new(Vec::new());
        let read = (&mut stdout)
            .take(MAX_VALUE_BYTES as u64 + 2)
            .read_to_end(&mut output);
        // Drain the rest so the program never blocks on a full pipe.
        let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        let _ = output_sender.send(read.map(|_| output));
    })
    .map_err(no_thread)?;
    let timeout = settings::rotator_timeout();
    let deadline = Instant::now() + timeout;
    // Between two looks at the program: the step's time, the server's shutdown and the
    // caller's cancel each end the wait.
    let keep_waiting = || -> Result<()> {
        if Instant::now() >= deadline {
            return Err(failed(format!("timed out after {} s", timeout.as_secs())));
        }
        if crate::worker::stop_requested() {
            return Err(failed("was stopped: the server is shutting down".into()));
        }
        pgrx::check_for_interrupts!();
        Ok(())
    };
    let status = loop {
        if let Some(status) = running
            .0
            .try_wait()
            .map_err(|e| failed(e.kind().to_string()))?
        {
            break status;
        }
        keep_waiting()?;
        std::thread::sleep(Duration::from_millis(10));
    };
    running.kill_group();
    let output = loop {
        match output_receiver.recv_timeout(Duration::from_millis(10)) {
            Ok(output) => break output,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => keep_waiting()?,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(failed("output could not be read".into()))
            }
        }
    }
    .map_err(|error| failed(format!("output could not be read: {}", error.kind())))?;
    if !status.success() {
        return Err(failed(match status.code() {
            Some(code) => format!("exited with status {code}"),
            None => "was killed by a signal".into(),
        }));
    }
    if step != Step::Create {
        return Ok(Zeroizing::new(Vec::new()));
    }
    new_value(output).map_err(failed)
}

/// The value a program printed at the create step, without one trailing line ending, or why
/// it is none: the same rules as a string value put from SQL.
fn new_value(mut value: Zeroizing<Vec<u8>>) -> std::result::Result<Zeroizing<Vec<u8>>, String> {
    for ending in [b'\n', b'\r'] {
        if value.last() == Some(&ending) {
            value.pop();
        }
    }
    if value.is_empty() {
        return Err("printed no value at the create step".into());
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "printed more than {MAX_VALUE_BYTES} bytes at the create step"
        ));
    }
    if std::str::from_utf8(&value).is_err() {
        return Err("printed a value that is not UTF-8 text".into());
    }
    // A string value from SQL never holds NUL (text cannot); one that did would read one way
    // in text format and another in binary.
    if value.contains(&0) {
        return Err("printed a value with a NUL byte".into());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_printed_value_follows_the_rules_of_a_string_value() {
        let value = |bytes: &[u8]| new_value(Zeroizing::new(bytes.to_vec()));
        assert_eq!(value(b"key-1\r\n").unwrap().as_slice(), b"key-1");
        assert_eq!(value(b"key-1\n\n").unwrap().as_slice(), b"key-1\n");
        for (bytes, why) in [
            (&b"\n"[..], "printed no value"),
            (
                &[b'x'; MAX_VALUE_BYTES + 1][..],
                "printed more than 65536 bytes",
            ),
            (&b"\xff\xfe"[..], "not UTF-8 text"),
            (&b"abc\0def"[..], "a NUL byte"),
        ] {
            let error = value(bytes).unwrap_err();
            assert!(error.contains(why), "{error}");
        }
    }
}
