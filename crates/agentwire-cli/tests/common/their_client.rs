//! Driving an agent with the published reference host client
//! (`microsandbox-agent-client` 0.7.13, a dev-dependency only), shared by
//! `tests/reference_host.rs` and `tests/vm.rs`.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use microsandbox_agent_client::stream::StreamReceiver;
use microsandbox_agent_client::{AgentClient, AgentProtocol, TypedMessage};
use microsandbox_protocol::core::CoreError;
use microsandbox_protocol::exec::{
    ExecExited, ExecFailed, ExecOutputAck, ExecRequest, ExecStarted, ExecStderr, ExecStdin, ExecStdinAck,
    ExecStdinError, ExecStdout,
};
use microsandbox_protocol::fs::{FsOp, FsOpenOptions, FsRequest, FsResponse, FsResponseData};
use microsandbox_protocol::message::{FLAG_TERMINAL, MessageType};

/// How long any one step may take (a VM under software emulation included).
pub const WAIT_SECS: u64 = 90;

pub async fn within<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f).await.unwrap_or_else(|_| panic!("{what} took over {secs} s"))
}

pub async fn wait_for(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "{what} did not happen within {secs} s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn alive(pid: u32) -> bool {
    // A zombie is dead already; the agent reaps its commands soon after.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

pub fn exec_request(cmd: &str, args: &[&str]) -> ExecRequest {
    ExecRequest {
        cmd: cmd.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        env: vec![],
        cwd: None,
        user: None,
        tty: false,
        rows: 24,
        cols: 80,
        rlimits: vec![],
    }
}

/// What one execution produced.
#[derive(Debug, Default)]
pub struct Outcome {
    pub pid: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: Option<i32>,
    pub failed: Option<ExecFailed>,
    pub stdin_errors: Vec<String>,
    /// The `consumed` of each `core.exec.stdin.ack`, in order (generation 10,
    /// controlled executions only).
    pub stdin_acks: Vec<u64>,
    /// Output frames (stdout and stderr) and the largest one's data size.
    pub output_frames: usize,
    pub largest_output: usize,
    /// Wire names of anything else that arrived on the execution's id.
    pub other: Vec<String>,
}

/// An execution in progress: its id and the receiving half of its stream.
pub struct Exec {
    pub id: u32,
    pub rx: StreamReceiver<AgentProtocol>,
    pub out: Outcome,
    /// Output consumed so far, acknowledged when the agent meters output
    /// (its `core.ready` has `exec_limits`; without them a host must not ack).
    pub acked: ExecOutputAck,
    pub metered: bool,
    /// Stdin bytes sent by [`Exec::stdin_within`].
    pub sent_stdin: u64,
}

impl Exec {
    pub async fn start(client: &AgentClient, request: &ExecRequest) -> Exec {
        let stream = within(
            WAIT_SECS,
            "opening the execution",
            client.stream(TypedMessage::new(MessageType::ExecRequest, request)),
        )
        .await
        .expect("core.exec.request goes out");
        let id = stream.id();
        let (_sender, rx) = stream.into_parts();
        let metered = client.ready().agent.exec_limits.is_some();
        Exec { id, rx, out: Outcome::default(), acked: ExecOutputAck::default(), metered, sent_stdin: 0 }
    }

    /// Takes one message; false once the stream has ended (terminal frame).
    pub async fn step(&mut self, client: &AgentClient) -> bool {
        let message = match self.rx.recv().await {
            Ok(Some(m)) => m,
            Ok(None) => return false,
            Err(e) => panic!("the execution's stream failed: {e}; so far {:?}", self.out),
        };
        match message.t.as_str() {
            "core.exec.started" => self.out.pid = Some(message.payload::<ExecStarted>().unwrap().pid),
            "core.exec.stdout" | "core.exec.stderr" => {
                let data = if message.t == "core.exec.stdout" {
                    message.payload::<ExecStdout>().unwrap().data
                } else {
                    message.payload::<ExecStderr>().unwrap().data
                };
                let n = data.len();
                self.out.output_frames += 1;
                self.out.largest_output = self.out.largest_output.max(n);
                if message.t == "core.exec.stdout" { &mut self.out.stdout } else { &mut self.out.stderr }
                    .extend_from_slice(&data);
                if self.metered {
                    self.acked.consume(n).unwrap();
                    let ack = TypedMessage::new(MessageType::ExecOutputAck, self.acked.clone());
                    client.send(self.id, ack).await.expect("core.exec.output.ack goes out");
                }
            }
            "core.exec.exited" => self.out.exit = Some(message.payload::<ExecExited>().unwrap().code),
            "core.exec.failed" => self.out.failed = Some(message.payload::<ExecFailed>().unwrap()),
            "core.exec.stdin.error" => self.out.stdin_errors.push(message.payload::<ExecStdinError>().unwrap().message),
            "core.exec.stdin.ack" => self.out.stdin_acks.push(message.payload::<ExecStdinAck>().unwrap().consumed),
            "core.error" => {
                let e = message.payload::<CoreError>().unwrap();
                self.out.other.push(format!("core.error {:?}: {}", e.kind, e.message));
            }
            other => self.out.other.push(other.to_string()),
        }
        message.flags & FLAG_TERMINAL == 0
    }

    /// [`Exec::step`] without acknowledgements, giving the stream's end as an error.
    pub async fn step_or_end(&mut self) -> Result<bool, String> {
        match self.rx.recv().await {
            Ok(Some(m)) => {
                if m.t == "core.exec.exited" {
                    self.out.exit = Some(m.payload::<ExecExited>().unwrap().code);
                }
                Ok(m.flags & FLAG_TERMINAL == 0)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Waits for `core.exec.started`; the pid.
    pub async fn started(&mut self, client: &AgentClient) -> u32 {
        within(WAIT_SECS, "core.exec.started", async {
            while self.out.pid.is_none() && self.out.failed.is_none() {
                if !self.step(client).await {
                    break;
                }
            }
        })
        .await;
        self.out.pid.unwrap_or_else(|| panic!("no core.exec.started: {:?}", self.out))
    }

    /// Reads until the terminal frame.
    pub async fn finish(mut self, client: &AgentClient) -> Outcome {
        within(WAIT_SECS, "the end of the execution", async { while self.step(client).await {} }).await;
        self.out
    }

    pub async fn stdin(&self, client: &AgentClient, data: &[u8]) {
        let m = TypedMessage::new(MessageType::ExecStdin, ExecStdin { data: data.to_vec() });
        client.send(self.id, m).await.expect("core.exec.stdin goes out");
    }

    /// Stdin bytes the agent has acknowledged so far (0 before any ack).
    pub fn stdin_acked(&self) -> u64 {
        self.out.stdin_acks.last().copied().unwrap_or(0)
    }

    /// Sends `data` as a controlled execution's stdin must go (spec 8): chunks
    /// of at most `chunk` bytes, and never more than `limit` bytes sent but not
    /// yet acknowledged by `core.exec.stdin.ack`. While there is no room it
    /// takes the execution's frames (acknowledging output as it comes), so a
    /// child that writes as it reads keeps going. Returns the bytes sent.
    pub async fn stdin_within(&mut self, client: &AgentClient, data: &[u8], chunk: usize, limit: u64) -> u64 {
        let base = self.sent_stdin;
        within(WAIT_SECS, "sending stdin within the input limit", async {
            for piece in data.chunks(chunk) {
                while self.sent_stdin + piece.len() as u64 - self.stdin_acked() > limit {
                    assert!(self.step(client).await, "the execution ended while stdin was going in: {:?}", self.out);
                }
                self.stdin(client, piece).await;
                self.sent_stdin += piece.len() as u64;
            }
        })
        .await;
        self.sent_stdin - base
    }
}

/// One filesystem request and its terminal response.
pub async fn fs(client: &AgentClient, op: FsOp) -> FsResponse {
    let what = format!("{op:?}");
    let reply = within(
        WAIT_SECS,
        &what,
        client.request(TypedMessage::new(MessageType::FsRequest, FsRequest { op, bulk: None })),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(reply.t, "core.fs.response", "{what}");
    assert_ne!(reply.flags & FLAG_TERMINAL, 0, "{what}: core.fs.response is terminal");
    reply.payload::<FsResponse>().unwrap()
}

pub async fn fs_ok(client: &AgentClient, op: FsOp) -> Option<FsResponseData> {
    let what = format!("{op:?}");
    let response = fs(client, op).await;
    assert!(response.ok, "{what}: {:?}", response.error);
    response.data
}

pub async fn open(client: &AgentClient, path: &str, options: FsOpenOptions) -> u64 {
    match fs_ok(client, FsOp::OpenFile { path: path.into(), options }).await {
        Some(FsResponseData::Handle(h)) => h,
        other => panic!("OpenFile {path}: {other:?}"),
    }
}

// ---------------------------------------------------------------------------

/// Runs `argv` to its end, with no stdin.
pub async fn run(client: &AgentClient, argv: &[&str]) -> Outcome {
    let exec = Exec::start(client, &exec_request(argv[0], &argv[1..])).await;
    exec.stdin(client, b"").await;
    exec.finish(client).await
}
