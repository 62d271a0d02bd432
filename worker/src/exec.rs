//! Exec mode: run a command per task. The payload arrives on stdin; the task's metadata in
//! environment variables (`SLUICE_TASK_ID`, `SLUICE_TASK_PROJECT`, `SLUICE_TASK_QUEUE`,
//! `SLUICE_TASK_ATTEMPT`, `SLUICE_TASK_CONTENT_TYPE`, and `SLUICE_HEADER_<NAME>` per header).
//! Exit 0 completes the task with stdout (at most 1 MiB) as its result; the configured
//! permanent exit code dead-letters it; any other exit is a transient failure, retried by the
//! queue's policy, with the end of stderr as the message.

use std::process::Stdio;

use sluice::proto::sluice::queue::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Failure, Handler, Task};

/// Most stdout kept as a result.
const MAX_RESULT: usize = 1024 * 1024;
/// Most stderr kept as a failure message.
const MAX_MESSAGE: usize = 4096;

/// Runs `program args…` per task.
#[derive(Debug, Clone)]
pub struct Exec {
    /// The command.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// The exit code that means "never retry".
    pub permanent_exit_code: i32,
}

fn env_name(header: &str) -> String {
    let mut name = String::from("SLUICE_HEADER_");
    name.extend(header.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    name
}

impl Handler for Exec {
    async fn handle(&self, task: Task) -> Result<Vec<u8>, Failure> {
        let mut command = tokio::process::Command::new(&self.program);
        command
            .args(&self.args)
            .env("SLUICE_TASK_ID", &task.id)
            .env("SLUICE_TASK_PROJECT", &task.project)
            .env("SLUICE_TASK_QUEUE", &task.queue)
            .env("SLUICE_TASK_ATTEMPT", task.attempt.to_string())
            .env("SLUICE_TASK_CONTENT_TYPE", &task.content_type)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A task that is stopped (timeout, revocation, drain) takes its process with it.
            .kill_on_drop(true);
        for (name, value) in &task.headers {
            command.env(env_name(name), value);
        }
        let mut child = command
            .spawn()
            .map_err(|e| Failure::transient(format!("cannot start {}: {e}", self.program)))?;
        let (mut stdin, mut stdout, mut stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let payload = task.payload;
        let write = async move {
            if let Some(stdin) = stdin.as_mut() {
                // A command that does not read its input is fine.
                let _ = stdin.write_all(&payload).await;
            }
            drop(stdin);
        };
        let read_out = async move {
            let mut out = Vec::new();
            if let Some(stdout) = stdout.as_mut() {
                let _ = stdout
                    .take(MAX_RESULT as u64 + 1)
                    .read_to_end(&mut out)
                    .await;
            }
            out
        };
        let read_err = async move {
            let mut err = Vec::new();
            if let Some(stderr) = stderr.as_mut() {
                let _ = stderr.read_to_end(&mut err).await;
            }
            err
        };
        let ((), out, err, status) = tokio::join!(write, read_out, read_err, child.wait());
        let status =
            status.map_err(|e| Failure::transient(format!("waiting for {}: {e}", self.program)))?;
        let tail = |err: &[u8]| {
            let text =
                String::from_utf8_lossy(&err[err.len().saturating_sub(MAX_MESSAGE)..]).into_owned();
            text.trim().to_owned()
        };
        match status.code() {
            Some(0) if out.len() > MAX_RESULT => Err(Failure::permanent(format!(
                "stdout is over {MAX_RESULT} bytes"
            ))),
            Some(0) => Ok(out),
            Some(code) if code == self.permanent_exit_code => {
                Err(Failure::permanent(format!("exit {code}: {}", tail(&err))))
            }
            code => Err(Failure {
                category: pb::FailureCategory::Transient,
                message: format!(
                    "exit {}: {}",
                    code.map_or("by signal".to_owned(), |c| c.to_string()),
                    tail(&err)
                ),
                retryable: None,
            }),
        }
    }
}
