//! envd, the daemon inside every E2B sandbox: Connect RPC (JSON codec) for processes and the
//! filesystem, plain HTTP for `/files` (see `files.rs`).
//!
//! Server-streaming calls (`process.Process/Start`) answer with Connect envelopes
//! (`flags:u8 | len:u32be | json`). HTTP chunks do not respect envelope boundaries, so
//! [`EnvelopeDecoder`] buffers until a whole envelope is there. The stream ends with an
//! end-of-stream envelope (flag `0x02`) that may carry an error; a stream that stops without one
//! is a transport failure, never a success.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use serde::Deserialize;
use tokio::time::Instant;

use super::Endpoint;
use crate::capped::CappedBuf;
use crate::sandbox::SandboxError;

/// Largest envelope accepted; envd sends at most 32 KiB of output per event.
const MAX_ENVELOPE: usize = 16 * 1024 * 1024;
const FLAG_COMPRESSED: u8 = 0x01;
const FLAG_END_STREAM: u8 = 0x02;

/// Extra time we give envd past the command's own deadline (sent as `Connect-Timeout-Ms`)
/// to report `deadline_exceeded` before we stop waiting ourselves.
const DEADLINE_GRACE: Duration = Duration::from_secs(15);

/// One Connect envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub flags: u8,
    pub payload: Bytes,
}

impl Envelope {
    pub fn is_end_stream(&self) -> bool {
        self.flags & FLAG_END_STREAM != 0
    }
}

/// Frames a request message: flags 0, big-endian length, payload.
pub fn encode_envelope(payload: &[u8]) -> Result<Vec<u8>, SandboxError> {
    let len = u32::try_from(payload.len()).map_err(|_| SandboxError::Transport {
        message: "request message too large for a Connect envelope".into(),
        retryable: false,
    })?;
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Reassembles envelopes from chunks cut anywhere.
#[derive(Debug, Default)]
pub struct EnvelopeDecoder {
    buf: BytesMut,
}

impl EnvelopeDecoder {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete envelope, `None` when more bytes are needed.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, String> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_ENVELOPE {
            return Err(format!("envd sent a {len}-byte message, over the limit"));
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err("envd sent a compressed message although none was accepted".into());
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(Envelope { flags, payload }))
    }

    /// Bytes received that do not form a whole envelope yet.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[derive(Debug, Deserialize)]
struct StartResponse {
    event: Option<ProcessEvent>,
}

#[derive(Debug, Deserialize)]
struct ProcessEvent {
    start: Option<StartEvent>,
    data: Option<DataEvent>,
    end: Option<EndEvent>,
    // `keepalive` and unknown events are ignored.
}

#[derive(Debug, Deserialize)]
struct StartEvent {
    #[serde(default)]
    pid: u32,
}

#[derive(Debug, Deserialize)]
struct DataEvent {
    stdout: Option<String>,
    stderr: Option<String>,
    pty: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndEvent {
    /// protojson omits zero values: a missing exit code means 0.
    #[serde(default)]
    exit_code: i32,
    status: Option<String>,
}

#[derive(Debug, Deserialize)]
struct EndStream {
    error: Option<ConnectError>,
}

/// A Connect error, as sent in an end-of-stream message or a unary error body.
#[derive(Debug, Deserialize)]
pub struct ConnectError {
    #[serde(default)]
    pub code: serde_json::Value,
    #[serde(default)]
    pub message: String,
}

/// What to start in the sandbox.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// Sent as `Connect-Timeout-Ms`: envd kills the process at this deadline.
    pub timeout: Duration,
    /// Bytes kept per stream (head and tail).
    pub output_cap: usize,
}

/// How a process ended.
#[derive(Debug, Clone, Default)]
pub struct ProcessResult {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub truncated: bool,
    /// The deadline passed and the process was killed.
    pub timed_out: bool,
    /// Our own deadline passed before envd's: this process may still run and must be killed.
    pub still_running: Option<u32>,
}

/// How far a failed run got, which decides whether it may be repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// envd refused or never saw the request: the process did not start.
    NotStarted,
    /// No answer before the header timeout: the process may or may not run.
    Unknown,
    /// The process started (with this pid) and the stream broke.
    Started(u32),
}

#[derive(Debug)]
pub struct RunError {
    pub error: SandboxError,
    pub progress: Progress,
}

impl RunError {
    fn not_started(error: SandboxError) -> Self {
        Self {
            error,
            progress: Progress::NotStarted,
        }
    }
}

/// Starts a process and follows its output to the end.
pub async fn run_process(
    endpoint: &Endpoint,
    spec: &ProcessSpec,
) -> Result<ProcessResult, RunError> {
    let mut process = serde_json::json!({
        "cmd": spec.cmd,
        "args": spec.args,
    });
    if !spec.envs.is_empty() {
        let envs: serde_json::Map<String, serde_json::Value> = spec
            .envs
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        process["envs"] = serde_json::Value::Object(envs);
    }
    if let Some(cwd) = &spec.cwd {
        process["cwd"] = serde_json::Value::String(cwd.clone());
    }
    let message = serde_json::json!({ "process": process, "stdin": false });
    let body = serde_json::to_vec(&message)
        .map_err(|e| RunError::not_started(SandboxError::Io(format!("encoding a request: {e}"))))
        .and_then(|m| encode_envelope(&m).map_err(RunError::not_started))?;

    // At most 10 digits, as connect-go requires.
    let timeout_ms = spec.timeout.as_millis().clamp(1, 9_999_999_999);
    let request = endpoint
        .envd_post("/process.Process/Start")
        .header("Content-Type", "application/connect+json")
        // No HTTP-level compression of the stream: a compressing proxy would hold output back.
        .header("Accept-Encoding", "identity")
        .header("Connect-Protocol-Version", "1")
        .header("Connect-Accept-Encoding", "identity")
        .header("Connect-Content-Encoding", "identity")
        .header("Connect-Timeout-Ms", timeout_ms.to_string())
        .header(
            "Keepalive-Ping-Interval",
            endpoint
                .timing
                .keepalive_interval
                .as_secs()
                .max(1)
                .to_string(),
        )
        .body(body);

    let response = match tokio::time::timeout(endpoint.timing.request_timeout, request.send()).await
    {
        Err(_) => {
            return Err(RunError {
                error: SandboxError::Transport {
                    message: format!(
                        "envd did not answer within {} s",
                        endpoint.timing.request_timeout.as_secs()
                    ),
                    retryable: true,
                },
                progress: Progress::Unknown,
            });
        }
        Ok(Err(e)) => {
            let progress = if e.is_connect() {
                Progress::NotStarted
            } else {
                Progress::Unknown
            };
            return Err(RunError {
                error: transport_error("starting a command", &e),
                progress,
            });
        }
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    if status != reqwest::StatusCode::OK {
        let text = read_error_body(response).await;
        return Err(RunError::not_started(endpoint.status_error(status, &text)));
    }

    let deadline = Instant::now() + spec.timeout + DEADLINE_GRACE;
    let mut stream = response.bytes_stream();
    let mut decoder = EnvelopeDecoder::default();
    let mut stdout = CappedBuf::new(spec.output_cap);
    let mut stderr = CappedBuf::new(spec.output_cap);
    let mut pid: Option<u32> = None;
    let mut end: Option<EndEvent> = None;
    let broken = |pid: Option<u32>, message: String| RunError {
        error: SandboxError::Transport {
            message,
            retryable: true,
        },
        progress: pid.map_or(Progress::Unknown, Progress::Started),
    };

    loop {
        // Drain every whole envelope before reading more.
        loop {
            let envelope = match decoder.next_envelope() {
                Ok(Some(envelope)) => envelope,
                Ok(None) => break,
                Err(e) => return Err(broken(pid, e)),
            };
            if envelope.is_end_stream() {
                let end_stream: EndStream = serde_json::from_slice(&envelope.payload)
                    .map_err(|e| broken(pid, format!("unreadable end of stream from envd: {e}")))?;
                return finish(end_stream, end, stdout, stderr, pid, spec.timeout);
            }
            let message: StartResponse = serde_json::from_slice(&envelope.payload)
                .map_err(|e| broken(pid, format!("unreadable process event from envd: {e}")))?;
            let Some(event) = message.event else { continue };
            if let Some(start) = event.start {
                pid = Some(start.pid);
            }
            if let Some(data) = event.data {
                for b64 in [data.stdout, data.pty].into_iter().flatten() {
                    stdout.push(&decode_b64(&b64).map_err(|e| broken(pid, e))?);
                }
                if let Some(b64) = data.stderr {
                    stderr.push(&decode_b64(&b64).map_err(|e| broken(pid, e))?);
                }
            }
            if let Some(ended) = event.end {
                end = Some(ended);
            }
        }
        let idle = endpoint.timing.stream_idle_timeout;
        let next = tokio::time::timeout_at(deadline.min(Instant::now() + idle), stream.next());
        match next.await {
            Ok(Some(Ok(chunk))) => decoder.push(&chunk),
            Ok(Some(Err(e))) => {
                return Err(broken(
                    pid,
                    format!("the command's output stream broke: {}", describe(&e)),
                ));
            }
            Ok(None) => {
                if let Some(ended) = end {
                    // The end event arrived but the end-of-stream message did not: the result
                    // is known, so keep it.
                    return Ok(result_from_end(&ended, stdout, stderr));
                }
                return Err(broken(
                    pid,
                    format!(
                        "the command's output stream ended without an end event{}",
                        if decoder.pending() > 0 {
                            " (cut mid-message)"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            Err(_) if Instant::now() >= deadline => {
                // envd did not enforce the deadline itself; it is ours all the same. The caller
                // kills the process, which may still run.
                let mut result = result_from_parts(124, stdout, stderr);
                result.timed_out = true;
                result.still_running = pid;
                let note = format!(
                    "\ncommand timed out after {} s and was killed\n",
                    spec.timeout.as_secs()
                );
                result.stderr.extend_from_slice(note.as_bytes());
                return Ok(result);
            }
            Err(_) => {
                return Err(broken(
                    pid,
                    format!(
                        "envd sent nothing (not even a keepalive) for {} s",
                        idle.as_secs()
                    ),
                ));
            }
        }
    }
}

fn finish(
    end_stream: EndStream,
    end: Option<EndEvent>,
    stdout: CappedBuf,
    stderr: CappedBuf,
    pid: Option<u32>,
    timeout: Duration,
) -> Result<ProcessResult, RunError> {
    match end_stream.error {
        None => match end {
            Some(ended) => Ok(result_from_end(&ended, stdout, stderr)),
            None => Err(RunError {
                error: SandboxError::Transport {
                    message: "envd closed the command's stream without an end event".into(),
                    retryable: true,
                },
                progress: pid.map_or(Progress::Unknown, Progress::Started),
            }),
        },
        Some(err) if connect_code(&err) == "deadline_exceeded" => {
            let mut result = result_from_parts(124, stdout, stderr);
            result.timed_out = true;
            let note = format!(
                "\ncommand timed out after {} s and was killed\n",
                timeout.as_secs()
            );
            result.stderr.extend_from_slice(note.as_bytes());
            Ok(result)
        }
        Some(err) => {
            let code = connect_code(&err);
            let error = match code.as_str() {
                "invalid_argument" | "failed_precondition" | "not_found" => {
                    SandboxError::Io(format!("envd refused the command: {}", err.message))
                }
                "unauthenticated" | "permission_denied" => SandboxError::Transport {
                    message: format!("envd refused the command ({code}): {}", err.message),
                    retryable: false,
                },
                _ => SandboxError::Transport {
                    message: format!("envd reported {code}: {}", err.message),
                    retryable: true,
                },
            };
            let progress = match (pid, end.is_some()) {
                (Some(pid), _) => Progress::Started(pid),
                (None, _) if code == "invalid_argument" => Progress::NotStarted,
                (None, _) => Progress::Unknown,
            };
            Err(RunError { error, progress })
        }
    }
}

fn result_from_end(end: &EndEvent, stdout: CappedBuf, stderr: CappedBuf) -> ProcessResult {
    let mut code = end.exit_code;
    // Go reports a signal death as exit code -1 with status "signal: killed"; show it the
    // way a shell would (128 + signal number), as the local backend does.
    if code == -1
        && let Some(signal) = end
            .status
            .as_deref()
            .and_then(|s| s.strip_prefix("signal: "))
    {
        code = 128 + signal_number(signal);
    }
    result_from_parts(code, stdout, stderr)
}

fn result_from_parts(exit_code: i32, stdout: CappedBuf, stderr: CappedBuf) -> ProcessResult {
    let truncated = stdout.truncated() || stderr.truncated();
    ProcessResult {
        exit_code,
        stdout: stdout.into_bytes(),
        stderr: stderr.into_bytes(),
        truncated,
        timed_out: false,
        still_running: None,
    }
}

fn signal_number(name: &str) -> i32 {
    match name {
        "hangup" => 1,
        "interrupt" => 2,
        "quit" => 3,
        "aborted" => 6,
        "killed" => 9,
        "segmentation fault" => 11,
        "broken pipe" => 13,
        "alarm clock" => 14,
        "terminated" => 15,
        _ => 0,
    }
}

fn connect_code(err: &ConnectError) -> String {
    match &err.code {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn decode_b64(text: &str) -> Result<Vec<u8>, String> {
    B64.decode(text)
        .map_err(|e| format!("envd sent output that is not base64: {e}"))
}

/// A unary Connect call (`ListDir`, `SendSignal`): plain JSON in and out.
pub async fn unary(
    endpoint: &Endpoint,
    method: &str,
    message: &serde_json::Value,
) -> Result<serde_json::Value, SandboxError> {
    let timeout_ms = endpoint
        .timing
        .request_timeout
        .as_millis()
        .clamp(1, 9_999_999_999);
    let request = endpoint
        .envd_post(method)
        .header("Content-Type", "application/json")
        .header("Connect-Protocol-Version", "1")
        .header("Accept-Encoding", "identity")
        .header("Content-Encoding", "identity")
        .header("Connect-Timeout-Ms", timeout_ms.to_string())
        .timeout(endpoint.timing.request_timeout)
        .json(message);
    let response = request
        .send()
        .await
        .map_err(|e| transport_error(method, &e))?;
    let status = response.status();
    if status != reqwest::StatusCode::OK {
        let text = read_error_body(response).await;
        return Err(endpoint.status_error(status, &text));
    }
    response
        .json()
        .await
        .map_err(|e| transport_error(method, &e))
}

/// `GET /health`: `Ok(true)` when envd answers, `Ok(false)` when the edge says the sandbox is gone.
pub async fn health(endpoint: &Endpoint) -> Result<bool, SandboxError> {
    let response = endpoint
        .envd_get("/health")
        // Only a probe on a failure path: do not make the failure wait long.
        .timeout(endpoint.timing.request_timeout.min(Duration::from_secs(10)))
        .send()
        .await
        .map_err(|e| transport_error("health check", &e))?;
    let status = response.status();
    if status.is_success() {
        return Ok(true);
    }
    let text = read_error_body(response).await;
    match endpoint.status_error(status, &text) {
        SandboxError::Gone(_) => Ok(false),
        other => Err(other),
    }
}

/// Reads at most a few KiB of an error body, for the message.
pub async fn read_error_body(response: reqwest::Response) -> String {
    let mut stream = response.bytes_stream();
    let mut out = Vec::new();
    let read = async {
        while let Some(Ok(chunk)) = stream.next().await {
            out.extend_from_slice(&chunk);
            if out.len() > 4096 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    // Prefer the `message` of a JSON error body.
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Object(map)) => match map.get("message") {
            Some(serde_json::Value::String(m)) => {
                let code = map.get("code").map(|c| match c {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
                match code {
                    Some(code) => format!("{code}: {m}"),
                    None => m.clone(),
                }
            }
            _ => crate::text::truncate_middle(&text, 300).0,
        },
        _ => crate::text::truncate_middle(text.trim(), 300).0,
    }
}

/// A reqwest failure as a retryable transport error. reqwest's messages hold the URL, which
/// carries no secret (keys travel only in headers).
pub fn transport_error(what: &str, e: &reqwest::Error) -> SandboxError {
    SandboxError::Transport {
        message: format!("{what}: {}", describe(e)),
        retryable: true,
    }
}

fn describe(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reassembles_envelopes_split_anywhere() {
        let a = encode_envelope(br#"{"event":{"start":{"pid":7}}}"#).unwrap();
        let b = encode_envelope(br#"{"event":{"data":{"stdout":"aGkK"}}}"#).unwrap();
        let mut end = vec![FLAG_END_STREAM, 0, 0, 0, 2];
        end.extend_from_slice(b"{}");
        let all = [a.clone(), b.clone(), end].concat();
        for cut in 0..all.len() {
            let mut decoder = EnvelopeDecoder::default();
            let mut got = Vec::new();
            for piece in [&all[..cut], &all[cut..]] {
                for byte in piece.chunks(3) {
                    decoder.push(byte);
                    while let Some(envelope) = decoder.next_envelope().unwrap() {
                        got.push(envelope);
                    }
                }
            }
            assert_eq!(got.len(), 3, "cut at {cut}");
            assert_eq!(&got[0].payload[..], &a[5..]);
            assert_eq!(&got[1].payload[..], &b[5..]);
            assert!(got[2].is_end_stream());
            assert_eq!(decoder.pending(), 0);
        }
    }

    #[test]
    fn refuses_oversized_and_compressed_envelopes() {
        let mut decoder = EnvelopeDecoder::default();
        decoder.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert!(decoder.next_envelope().is_err());
        let mut decoder = EnvelopeDecoder::default();
        decoder.push(&[FLAG_COMPRESSED, 0, 0, 0, 0]);
        assert!(decoder.next_envelope().is_err());
    }

    #[test]
    fn end_event_defaults_and_signals() {
        let end: EndEvent =
            serde_json::from_str(r#"{"exited":true,"status":"exit status 0"}"#).unwrap();
        assert_eq!(
            result_from_end(&end, CappedBuf::new(10), CappedBuf::new(10)).exit_code,
            0
        );
        let end: EndEvent = serde_json::from_str(
            r#"{"exitCode":-1,"status":"signal: killed","error":"signal: killed"}"#,
        )
        .unwrap();
        assert_eq!(
            result_from_end(&end, CappedBuf::new(10), CappedBuf::new(10)).exit_code,
            137
        );
    }
}
