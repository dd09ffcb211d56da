//! The ceiling for benchmarks: a bare hyper HTTP/1.1 server on the same runtime settings as the
//! gateway, answering every request with a fixed body. Whatever Spindle adds on top of this is
//! the cost of the chain. `spindle bench-ceiling` runs the same server.
//!
//! ```text
//! hyper-hello [ADDR]                        (default 127.0.0.1:8090)
//! hyper-hello bench-ceiling --listen ADDR   (the `spindle` form, so this crate's tests can
//!                                            start it the way `spindle bench` does)
//! hyper-hello run CONFIG --listen ADDR --dataplane D
//!                                           (test stand-in for a Spindle target: the same
//!                                            ceiling server, so this crate's tests can run
//!                                            rounds and ratios without building the gateway)
//! ```

use std::net::SocketAddr;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = match args.as_slice() {
        [] => "127.0.0.1:8090",
        [addr] => addr.as_str(),
        [sub, flag, addr] if sub == "bench-ceiling" && flag == "--listen" => addr.as_str(),
        [sub, _config, flag, addr, dp, _]
            if sub == "run" && flag == "--listen" && dp == "--dataplane" =>
        {
            addr.as_str()
        }
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "usage: hyper-hello [ADDR] | hyper-hello bench-ceiling --listen ADDR \
                 | hyper-hello run CONFIG --listen ADDR --dataplane D",
            ));
        }
    };
    let addr: SocketAddr = arg.parse().map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("bad address `{arg}`: {e}"),
        )
    })?;
    eprintln!("hyper-hello serving on http://{addr}");
    spindle_bench::serve_ceiling(addr).await
}
