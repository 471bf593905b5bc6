//! Runs a command in the guest: `cargo run --example exec -- unix:PATH CMD [ARGS...]`.
//! Its stdout and stderr are printed, and its status becomes this program's.
use agentwire_client::{Client, ClientError, Command};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<std::process::ExitCode, ClientError> {
    let mut args = std::env::args().skip(1);
    let (addr, cmd) = (args.next().expect("usage: exec unix:PATH CMD [ARGS...]"), args.next().expect("CMD"));
    let path = addr.strip_prefix("unix:").unwrap_or(&addr).to_string();
    let client = Client::connect(tokio::net::UnixStream::connect(path).await?).await?;
    let exec = client.exec(Command::new(cmd).args(args)).await?;
    let (mut out, mut err) = (tokio::io::stdout(), tokio::io::stderr());
    let status = exec.pipe(tokio::io::empty(), &mut out, &mut err).await?;
    Ok(std::process::ExitCode::from(status.shell_code()))
}
