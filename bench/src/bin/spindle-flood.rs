//! spindle-flood: a bounded flood of TCP SYNs or UDP datagrams at one IPv4 address and port,
//! for measuring what the ingress guard costs and saves (bench/ingress.sh).
//!
//! ```text
//! spindle-flood --target IP:PORT [--kind syn|udp] [--source ADDR|CIDR] [--pps N]
//!               [--duration 10s] [--count N] [--payload-bytes 18] [--batch 32] [--seed N]
//! ```
//!
//! Packets are built here, IPv4 and TCP/UDP headers with their checksums, and sent through
//! one raw socket (`IPPROTO_RAW`, which implies `IP_HDRINCL`: the kernel routes each packet
//! and sends it as built; it only fills in the IP checksum again), `--batch` at a time with
//! `sendmmsg`. Every packet gets a random source port (and TCP sequence number and IP id);
//! `--source` sets the source address: one address, or a CIDR to spoof a random address of
//! it per packet. The default is the address the kernel would use to reach the target.
//!
//! It always stops by itself: after `--duration` (default 10 s) or `--count` packets,
//! whichever comes first. `--pps 0` (default) sends as fast as it can; otherwise packet n
//! is due at start + n / pps. At the end it prints one JSON object: packets sent, achieved
//! packets/s, send errors by kind (ENOBUFS: the device dropped it, e.g. a veth whose peer's
//! queue is full; `IP_RECVERR` is set so that such drops are not reported as sent) and its
//! own CPU time (tick-based accounting, so softirq
//! work done on its CPU during its system calls, such as a veth peer's receive path, is
//! charged to it too).
//!
//! As a safety rail it sends only inside a network namespace made with `ip netns add` (run
//! under `ip netns exec`), or else to and from 127.0.0.0/8 only: neither the packets nor the
//! replies to spoofed sources may leave the machine.
//!
//! Needs CAP_NET_RAW (root).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::libc;

const USAGE: &str = "\
usage: spindle-flood --target IP:PORT [--kind syn|udp] [--source ADDR|CIDR] [--pps N]
                     [--duration 10s] [--count N] [--payload-bytes 18] [--batch 32] [--seed N]

  --target IP:PORT     IPv4 address and port the packets go to
  --kind syn|udp       TCP SYNs (default) or UDP datagrams
  --source ADDR|CIDR   source address, or a CIDR to spoof a random address of per packet
                       (default: the address the kernel uses towards the target)
  --pps N              packets per second; 0 (default): as fast as possible
  --duration D         stop after D (10s, 500ms, 2m; default 10s)
  --count N            stop after N packets
  --payload-bytes N    UDP payload size (default 18, at most 1472)
  --batch N            packets per sendmmsg call (default 32, at most 1024)
  --seed N             seed of the random ports, ids and addresses (default: from the clock)

Prints one JSON object when done. Outside a namespace made with `ip netns add`, sends only
to and from 127.0.0.0/8.";

/// What a run sends.
#[derive(Clone, Debug, PartialEq)]
struct Args {
    target: SocketAddrV4,
    kind: Kind,
    source: Option<Cidr>,
    pps: u64,
    duration: Duration,
    count: Option<u64>,
    payload_bytes: usize,
    batch: usize,
    seed: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Syn,
    Udp,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Syn => "syn",
            Kind::Udp => "udp",
        }
    }
}

/// The largest UDP payload that fits a 1500-byte MTU unfragmented.
const MAX_UDP_PAYLOAD: usize = 1500 - packet::IPV4_LEN - packet::UDP_LEN;
const MAX_BATCH: usize = 1024;

enum Parsed {
    Run(Args),
    Help,
}

fn parse_args(args: &[String]) -> Result<Parsed, String> {
    let mut target = None;
    let mut kind = Kind::Syn;
    let mut source = None;
    let mut pps = 0u64;
    let mut duration = Duration::from_secs(10);
    let mut count = None;
    let mut payload_bytes = 18usize;
    let mut batch = 32usize;
    let mut seed = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        if flag == "-h" || flag == "--help" {
            return Ok(Parsed::Help);
        }
        let mut value = || -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag {
            "--target" => {
                let v = value()?;
                let addr: SocketAddrV4 = v.parse().map_err(|_| {
                    format!("--target: `{v}` is not an IPv4 address and port, like 198.18.0.2:8080")
                })?;
                if addr.port() == 0 {
                    return Err("--target: port 0 is not a port".into());
                }
                target = Some(addr);
            }
            "--kind" => {
                kind = match value()?.as_str() {
                    "syn" => Kind::Syn,
                    "udp" => Kind::Udp,
                    other => return Err(format!("--kind: `{other}` is neither syn nor udp")),
                }
            }
            "--source" => source = Some(Cidr::parse(&value()?)?),
            "--pps" => pps = number(flag, &value()?)?,
            "--duration" => {
                let v = value()?;
                duration =
                    spindle_bench::parse_duration(&v).map_err(|e| format!("--duration: {e}"))?;
                if duration.is_zero() {
                    return Err("--duration: must be more than 0".into());
                }
            }
            "--count" => {
                let n = number(flag, &value()?)?;
                if n == 0 {
                    return Err("--count: must be at least 1".into());
                }
                count = Some(n);
            }
            "--payload-bytes" => {
                payload_bytes = number(flag, &value()?)? as usize;
                if payload_bytes > MAX_UDP_PAYLOAD {
                    return Err(format!(
                        "--payload-bytes: {payload_bytes} is more than {MAX_UDP_PAYLOAD} \
                         (a 1500-byte packet)"
                    ));
                }
            }
            "--batch" => {
                batch = number(flag, &value()?)? as usize;
                if batch == 0 || batch > MAX_BATCH {
                    return Err(format!("--batch: must be 1 to {MAX_BATCH}"));
                }
            }
            "--seed" => seed = Some(number(flag, &value()?)?),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let target = target.ok_or("--target IP:PORT is required")?;
    if kind == Kind::Syn && args.iter().any(|a| a.starts_with("--payload-bytes")) {
        return Err("--payload-bytes is for --kind udp (SYNs carry no payload)".into());
    }
    Ok(Parsed::Run(Args {
        target,
        kind,
        source,
        pps,
        duration,
        count,
        payload_bytes,
        batch,
        seed,
    }))
}

fn number(flag: &str, v: &str) -> Result<u64, String> {
    v.parse()
        .map_err(|_| format!("{flag}: `{v}` is not a whole number"))
}

/// An IPv4 network: one address (/32) or a range to pick sources from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    base: u32,
    prefix: u8,
}

impl Cidr {
    fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("--source: `{addr}` is not an IPv4 address"))?;
        let prefix = match prefix {
            None => 32,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if (1..=32).contains(&n) => n,
                _ => return Err(format!("--source: prefix `/{p}` must be /1 to /32")),
            },
        };
        let mask = Self::mask(prefix);
        let base = u32::from(addr);
        if base & !mask != 0 {
            return Err(format!(
                "--source: {s} has host bits set; the network is {}/{prefix}",
                Ipv4Addr::from(base & mask)
            ));
        }
        Ok(Cidr { base, prefix })
    }

    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        }
    }

    /// A random address of the network; for /30 and wider, neither the network's own
    /// address nor its broadcast.
    fn pick(&self, rng: &mut Rng) -> Ipv4Addr {
        let hosts = !Self::mask(self.prefix);
        let host = if self.prefix >= 31 {
            (rng.next() as u32) & hosts
        } else {
            1 + (rng.next() % u64::from(hosts - 1)) as u32
        };
        Ipv4Addr::from(self.base | host)
    }

    #[cfg(test)]
    fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & Self::mask(self.prefix) == self.base
    }

    fn is_loopback(&self) -> bool {
        self.prefix >= 8 && Ipv4Addr::from(self.base).is_loopback()
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

/// xorshift64*: fast, and good enough for ports, ids and host parts.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Building the packets: pure functions over byte buffers.
mod packet {
    use std::net::Ipv4Addr;

    pub const IPV4_LEN: usize = 20;
    pub const TCP_LEN: usize = 24; // 20 + the MSS option
    pub const UDP_LEN: usize = 8;
    pub const SYN_LEN: usize = IPV4_LEN + TCP_LEN;

    pub const PROTO_TCP: u8 = 6;
    pub const PROTO_UDP: u8 = 17;

    /// What changes from packet to packet.
    #[derive(Clone, Copy, Debug)]
    pub struct Fields {
        pub src: Ipv4Addr,
        pub dst: Ipv4Addr,
        pub src_port: u16,
        pub dst_port: u16,
        pub ip_id: u16,
        pub seq: u32,
    }

    /// The one's complement sum of `data` as big-endian 16-bit words (an odd last byte
    /// padded with zero), added to `acc`, not folded.
    pub fn sum(data: &[u8], mut acc: u64) -> u64 {
        let mut words = data.chunks_exact(2);
        for w in &mut words {
            acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [last] = words.remainder() {
            acc += u64::from(*last) << 8;
        }
        acc
    }

    /// Folds a sum into 16 bits and complements it: the Internet checksum (RFC 1071).
    pub fn finish(mut acc: u64) -> u16 {
        while acc >> 16 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }

    /// The TCP/UDP checksum of `segment` (header with a zero checksum field, and payload)
    /// under the IPv4 pseudo-header.
    pub fn transport_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
        let mut acc = sum(&src.octets(), 0);
        acc = sum(&dst.octets(), acc);
        acc += u64::from(proto);
        acc += segment.len() as u64;
        finish(sum(segment, acc))
    }

    fn ipv4(buf: &mut [u8], f: &Fields, proto: u8, total: usize) {
        buf[0] = 0x45; // version 4, 5 words
        buf[1] = 0; // DSCP/ECN
        buf[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        buf[4..6].copy_from_slice(&f.ip_id.to_be_bytes());
        buf[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
        buf[8] = 64; // TTL
        buf[9] = proto;
        buf[10..12].fill(0);
        buf[12..16].copy_from_slice(&f.src.octets());
        buf[16..20].copy_from_slice(&f.dst.octets());
        let check = finish(sum(&buf[..IPV4_LEN], 0));
        buf[10..12].copy_from_slice(&check.to_be_bytes());
    }

    /// A TCP SYN with an MSS option (1460), as a client's first packet: `SYN_LEN` bytes.
    pub fn syn(buf: &mut [u8; SYN_LEN], f: &Fields) {
        ipv4(buf, f, PROTO_TCP, SYN_LEN);
        let tcp = &mut buf[IPV4_LEN..];
        tcp[0..2].copy_from_slice(&f.src_port.to_be_bytes());
        tcp[2..4].copy_from_slice(&f.dst_port.to_be_bytes());
        tcp[4..8].copy_from_slice(&f.seq.to_be_bytes());
        tcp[8..12].fill(0); // no ACK number
        tcp[12] = ((TCP_LEN / 4) as u8) << 4; // data offset, no reserved bits
        tcp[13] = 0x02; // SYN
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes()); // window
        tcp[16..18].fill(0); // checksum, below
        tcp[18..20].fill(0); // urgent pointer
        tcp[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
        let check = transport_checksum(f.src, f.dst, PROTO_TCP, tcp);
        tcp[16..18].copy_from_slice(&check.to_be_bytes());
    }

    /// A UDP datagram whose payload is `buf[IPV4_LEN + UDP_LEN..]`, as already filled in
    /// (see [`fill_payload`]); the headers are written over the first bytes.
    pub fn udp(buf: &mut [u8], f: &Fields) {
        let total = buf.len();
        ipv4(buf, f, PROTO_UDP, total);
        let udp = &mut buf[IPV4_LEN..];
        let len = udp.len() as u16;
        udp[0..2].copy_from_slice(&f.src_port.to_be_bytes());
        udp[2..4].copy_from_slice(&f.dst_port.to_be_bytes());
        udp[4..6].copy_from_slice(&len.to_be_bytes());
        udp[6..8].fill(0);
        let check = match transport_checksum(f.src, f.dst, PROTO_UDP, udp) {
            0 => 0xffff, // 0 means "no checksum" in UDP over IPv4 (RFC 768)
            c => c,
        };
        udp[6..8].copy_from_slice(&check.to_be_bytes());
    }

    /// The UDP payload every datagram carries: the text `spindle-flood ` repeated.
    pub fn fill_payload(payload: &mut [u8]) {
        for (b, p) in payload.iter_mut().zip(b"spindle-flood ".iter().cycle()) {
            *b = *p;
        }
    }
}

/// What a run did: the JSON it prints.
#[derive(Debug, serde::Serialize)]
struct Outcome {
    kind: &'static str,
    target: String,
    sources: String,
    packet_bytes: usize,
    packets: u64,
    bytes: u64,
    elapsed_s: f64,
    pps: f64,
    intended_pps: Option<u64>,
    send_errors: u64,
    /// errno name -> packets the kernel refused with it.
    send_error_kinds: std::collections::BTreeMap<String, u64>,
    cpu_user_s: f64,
    cpu_system_s: f64,
    stopped_by: &'static str,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&args) {
        Ok(Parsed::Run(a)) => a,
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("spindle-flood: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(outcome) => {
            println!(
                "{}",
                serde_json::to_string(&outcome).expect("the outcome serialises")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("spindle-flood: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Whether this process is in a network namespace made with `ip netns add` (one of the
/// namespaces bound under /run/netns), rather than the host's or another one nobody named.
fn in_named_netns() -> Result<bool, String> {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::metadata("/proc/self/ns/net")
        .map_err(|e| format!("reading /proc/self/ns/net: {e}"))?;
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Ok(false);
    };
    Ok(entries.flatten().any(|e| {
        std::fs::metadata(e.path()).is_ok_and(|m| m.dev() == own.dev() && m.ino() == own.ino())
    }))
}

/// The address the kernel would send from towards `target` (no packet is sent).
fn route_source(target: SocketAddrV4) -> Result<Ipv4Addr, String> {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect(target).map(|()| s))
        .and_then(|s| s.local_addr())
        .map_err(|e| format!("no route to {}: {e}", target.ip()))?;
    match probe {
        std::net::SocketAddr::V4(a) => Ok(*a.ip()),
        std::net::SocketAddr::V6(_) => Err("the route's source is not IPv4".into()),
    }
}

fn raw_socket() -> Result<OwnedFd, String> {
    // SAFETY: a plain syscall with constant arguments; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        let hint = if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) {
            " (needs CAP_NET_RAW: run as root)"
        } else {
            ""
        };
        return Err(format!("opening a raw IPv4 socket: {e}{hint}"));
    }
    // SAFETY: a new descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // Without IP_RECVERR a raw socket reports a packet the device dropped (ENOBUFS: a full
    // queue, such as a veth peer's XDP ring) as sent.
    let on: libc::c_int = 1;
    // SAFETY: a plain setsockopt with a pointer to an int that outlives the call and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_RECVERR,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(format!(
            "setting IP_RECVERR: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(socket)
}

fn errno_name(code: i32) -> String {
    match code {
        libc::ENOBUFS => "ENOBUFS".into(),
        libc::EAGAIN => "EAGAIN".into(),
        libc::EPERM => "EPERM".into(),
        libc::ENETUNREACH => "ENETUNREACH".into(),
        libc::EHOSTUNREACH => "EHOSTUNREACH".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EMSGSIZE => "EMSGSIZE".into(),
        other => format!("errno {other}"),
    }
}

fn run(args: &Args) -> Result<Outcome, String> {
    let own = route_source(args.target)?;
    let sources = args.source.unwrap_or(Cidr {
        base: u32::from(own),
        prefix: 32,
    });
    let local = args.target.ip().is_loopback() && sources.is_loopback();
    if !local && !in_named_netns()? {
        return Err(format!(
            "outside a namespace made with `ip netns add`, only 127.0.0.0/8 targets and \
             sources (target {}, sources {sources}); run it as `ip netns exec NS spindle-flood \
             ...` in a namespace of your own",
            args.target.ip()
        ));
    }
    let socket = raw_socket()?;
    let packet_bytes = match args.kind {
        Kind::Syn => packet::SYN_LEN,
        Kind::Udp => packet::IPV4_LEN + packet::UDP_LEN + args.payload_bytes,
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut rng = Rng::new(seed);

    // One buffer per message of a batch; the iovecs and headers point into them and are
    // built once: the buffers are never resized, so their addresses stay put.
    let mut buffers: Vec<Vec<u8>> = (0..args.batch)
        .map(|_| {
            let mut b = vec![0u8; packet_bytes];
            if args.kind == Kind::Udp {
                packet::fill_payload(&mut b[packet::IPV4_LEN + packet::UDP_LEN..]);
            }
            b
        })
        .collect();
    // SAFETY: sockaddr_in is plain old data; all zeroes is a valid value.
    let mut dest: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    dest.sin_family = libc::AF_INET as libc::sa_family_t;
    dest.sin_addr.s_addr = u32::from(*args.target.ip()).to_be();
    let mut iovecs: Vec<libc::iovec> = buffers
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut headers: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is plain old data; all zeroes is a valid (empty) value.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&raw mut dest).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();

    let mut sent = 0u64;
    let mut errors = std::collections::BTreeMap::<String, u64>::new();
    let mut error_total = 0u64;
    let limit = args.count.unwrap_or(u64::MAX);
    let start = Instant::now();
    let stopped_by = loop {
        let elapsed = start.elapsed();
        if elapsed >= args.duration {
            break "duration";
        }
        let attempted = sent + error_total;
        if attempted >= limit {
            break "count";
        }
        let mut n = (args.batch as u64).min(limit - attempted);
        if args.pps > 0 {
            let due = (elapsed.as_secs_f64() * args.pps as f64) as u64 + 1;
            if due <= attempted {
                let next = Duration::from_secs_f64((attempted + 1) as f64 / args.pps as f64);
                std::thread::sleep(next.saturating_sub(elapsed).min(args.duration - elapsed));
                continue;
            }
            n = n.min(due - attempted);
        }
        let n = n as usize;
        for buf in &mut buffers[..n] {
            let fields = packet::Fields {
                src: if sources.prefix == 32 {
                    Ipv4Addr::from(sources.base)
                } else {
                    sources.pick(&mut rng)
                },
                dst: *args.target.ip(),
                src_port: 1024 + (rng.next() % (65536 - 1024)) as u16,
                dst_port: args.target.port(),
                ip_id: rng.next() as u16,
                seq: rng.next() as u32,
            };
            match args.kind {
                Kind::Syn => {
                    let b: &mut [u8; packet::SYN_LEN] =
                        buf.as_mut_slice().try_into().expect("a SYN-sized buffer");
                    packet::syn(b, &fields);
                }
                Kind::Udp => packet::udp(buf, &fields),
            }
        }
        // sendmmsg stops at a message the kernel refuses and returns how many went before it
        // (that message's error is lost): the next call starts with it, so a refused packet
        // gets a second try and counts as an error when that fails too.
        let mut first = 0usize;
        while first < n {
            // SAFETY: headers[first..n] are initialised mmsghdrs whose name and iovec point
            // at `dest` and `buffers`, which live (unmoved) past the call.
            let rc = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    headers[first..].as_mut_ptr(),
                    (n - first) as libc::c_uint,
                    0,
                )
            };
            if rc >= 0 {
                sent += rc as u64;
                first += rc as usize;
                continue;
            }
            let e = std::io::Error::last_os_error();
            let code = e.raw_os_error().unwrap_or(0);
            match code {
                libc::EINTR => continue,
                // The device queue or socket buffer is full: that packet is lost; go on.
                libc::ENOBUFS | libc::EAGAIN => {
                    *errors.entry(errno_name(code)).or_default() += 1;
                    error_total += 1;
                    first += 1;
                }
                _ => {
                    return Err(format!(
                        "sending to {} after {sent} packets: {e}",
                        args.target.ip()
                    ));
                }
            }
        }
    };
    let elapsed = start.elapsed().as_secs_f64();
    let (cpu_user_s, cpu_system_s) = own_cpu()?;
    Ok(Outcome {
        kind: args.kind.name(),
        target: args.target.to_string(),
        sources: sources.to_string(),
        packet_bytes,
        packets: sent,
        bytes: sent * packet_bytes as u64,
        elapsed_s: elapsed,
        pps: sent as f64 / elapsed,
        intended_pps: (args.pps > 0).then_some(args.pps),
        send_errors: error_total,
        send_error_kinds: errors,
        cpu_user_s,
        cpu_system_s,
        stopped_by,
    })
}

/// This process's user and system CPU seconds so far.
fn own_cpu() -> Result<(f64, f64), String> {
    // SAFETY: rusage is plain old data; getrusage fills it in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage that outlives the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Err(format!("getrusage: {}", std::io::Error::last_os_error()));
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((secs(usage.ru_utime), secs(usage.ru_stime)))
}

#[cfg(test)]
mod tests {
    use super::packet::{self, Fields};
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// An independent Internet checksum check, written differently from `packet::sum`:
    /// byte by byte into a 32-bit accumulator with an end-around carry at every step.
    /// Returns true when `data` (which includes its checksum field) sums to 0xffff.
    fn verifies(data: &[u8]) -> bool {
        let mut acc: u32 = 0;
        for (i, &b) in data.iter().enumerate() {
            acc += if i % 2 == 0 {
                u32::from(b) << 8
            } else {
                u32::from(b)
            };
            if acc > 0xffff {
                acc = (acc & 0xffff) + 1;
            }
        }
        acc == 0xffff
    }

    fn pseudo_and_segment(packet: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&packet[12..20]); // source, destination
        v.push(0);
        v.push(packet[9]); // protocol
        v.extend_from_slice(&((packet.len() - packet::IPV4_LEN) as u16).to_be_bytes());
        v.extend_from_slice(&packet[packet::IPV4_LEN..]);
        v
    }

    fn fields() -> Fields {
        Fields {
            src: Ipv4Addr::new(198, 18, 0, 1),
            dst: Ipv4Addr::new(198, 18, 1, 2),
            src_port: 40000,
            dst_port: 8080,
            ip_id: 0x1234,
            seq: 0x0102_0304,
        }
    }

    #[test]
    fn checksum_of_a_well_known_ipv4_header() {
        // The IPv4 header used as the checksum example in many references; its checksum
        // field holds 0xb861.
        let mut header = hex("4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7");
        assert!(verifies(&header));
        header[10] = 0;
        header[11] = 0;
        assert_eq!(packet::finish(packet::sum(&header, 0)), 0xb861);
    }

    #[test]
    fn syn_matches_an_independently_built_packet() {
        // Built by Scapy 2.8 from the same fields: IP(src="198.18.0.1", dst="198.18.1.2",
        // id=0x1234, flags="DF", ttl=64) / TCP(sport=40000, dport=8080, seq=0x01020304,
        // flags="S", window=64240, options=[("MSS", 1460)]).
        let expected = hex("4500 002c 1234 4000 4006 9b70 c612 0001 c612 0102 \
             9c40 1f90 0102 0304 0000 0000 6002 faf0 5037 0000 0204 05b4");
        let mut buf = [0u8; packet::SYN_LEN];
        packet::syn(&mut buf, &fields());
        assert_eq!(buf.as_slice(), expected.as_slice());
    }

    #[test]
    fn udp_matches_independently_built_packets() {
        // Scapy 2.8: IP(src="198.18.0.1", dst="198.18.1.2", id=0x1234, flags="DF", ttl=64)
        // / UDP(sport=40000, dport=9999) / payload, for an even and an odd payload length.
        let f = Fields {
            dst_port: 9999,
            ..fields()
        };
        for (payload, expected) in [
            (
                18,
                "4500 002e 1234 4000 4011 9b63 c612 0001 c612 0102 \
                 9c40 270f 001a f1ee 7370 696e 646c 652d 666c 6f6f 6420 7370 696e",
            ),
            (
                5,
                "4500 0021 1234 4000 4011 9b70 c612 0001 c612 0102 \
                 9c40 270f 000d 6e7d 7370 696e 64",
            ),
        ] {
            let mut buf = vec![0u8; packet::IPV4_LEN + packet::UDP_LEN + payload];
            packet::fill_payload(&mut buf[packet::IPV4_LEN + packet::UDP_LEN..]);
            packet::udp(&mut buf, &f);
            assert_eq!(buf, hex(expected), "payload of {payload} bytes");
        }
    }

    #[test]
    fn every_random_packet_verifies_and_a_flipped_bit_does_not() {
        let mut rng = Rng::new(7);
        let cidr = Cidr::parse("198.18.128.0/17").unwrap();
        for i in 0..2000 {
            let f = Fields {
                src: cidr.pick(&mut rng),
                dst: Ipv4Addr::from(rng.next() as u32),
                src_port: rng.next() as u16,
                dst_port: rng.next() as u16,
                ip_id: rng.next() as u16,
                seq: rng.next() as u32,
            };
            let mut packet = if i % 2 == 0 {
                let mut b = [0u8; packet::SYN_LEN];
                packet::syn(&mut b, &f);
                b.to_vec()
            } else {
                let mut b = vec![0u8; packet::IPV4_LEN + packet::UDP_LEN + (i % 37)];
                packet::fill_payload(&mut b[packet::IPV4_LEN + packet::UDP_LEN..]);
                packet::udp(&mut b, &f);
                b
            };
            assert!(cidr.contains(f.src));
            assert!(verifies(&packet[..packet::IPV4_LEN]), "IPv4 header of {i}");
            assert!(verifies(&pseudo_and_segment(&packet)), "transport of {i}");
            // One flipped bit anywhere after the IP header breaks the transport checksum,
            // and one in the IP header breaks that header's.
            let at = (rng.next() as usize) % packet.len();
            packet[at] ^= 1 << (rng.next() % 8);
            if at < packet::IPV4_LEN {
                assert!(!verifies(&packet[..packet::IPV4_LEN]), "IPv4 header of {i}");
            } else {
                assert!(!verifies(&pseudo_and_segment(&packet)), "transport of {i}");
            }
        }
    }

    #[test]
    fn udp_checksum_zero_is_sent_as_all_ones() {
        // Find fields whose UDP checksum computes to 0 and check it goes out as 0xffff
        // (which still verifies: in one's complement, 0xffff and 0 are both zero).
        let mut rng = Rng::new(3);
        let mut found = false;
        for _ in 0..400_000 {
            let f = Fields {
                src_port: rng.next() as u16,
                ..fields()
            };
            let mut b = vec![0u8; packet::IPV4_LEN + packet::UDP_LEN];
            packet::udp(&mut b, &f);
            let mut zeroed = b.clone();
            zeroed[26] = 0;
            zeroed[27] = 0;
            let seg = &zeroed[packet::IPV4_LEN..];
            if packet::transport_checksum(f.src, f.dst, packet::PROTO_UDP, seg) == 0 {
                assert_eq!(&b[26..28], &[0xff, 0xff]);
                assert!(verifies(&pseudo_and_segment(&b)));
                found = true;
                break;
            }
        }
        assert!(found, "no source port gave a zero checksum");
    }

    #[test]
    fn picks_stay_inside_the_network_and_skip_its_edges() {
        let mut rng = Rng::new(11);
        let net = Cidr::parse("198.18.9.0/30").unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            seen.insert(net.pick(&mut rng));
        }
        let want: std::collections::BTreeSet<_> =
            [Ipv4Addr::new(198, 18, 9, 1), Ipv4Addr::new(198, 18, 9, 2)].into();
        assert_eq!(seen, want);
        let one = Cidr::parse("198.18.9.7").unwrap();
        assert_eq!(one.pick(&mut rng), Ipv4Addr::new(198, 18, 9, 7));
        assert!(Cidr::parse("127.0.0.0/8").unwrap().is_loopback());
        assert!(!Cidr::parse("0.0.0.0/1").unwrap().is_loopback());
    }

    fn parse(args: &str) -> Result<Args, String> {
        let v: Vec<String> = args.split_whitespace().map(String::from).collect();
        match parse_args(&v)? {
            Parsed::Run(a) => Ok(a),
            Parsed::Help => Err("help".into()),
        }
    }

    #[test]
    fn arguments() {
        let a = parse(
            "--target 198.18.1.2:8080 --kind udp --source 198.18.64.0/18 --pps=5000 \
                       --duration 500ms --count 9 --payload-bytes 100 --batch 8 --seed 5",
        )
        .unwrap();
        assert_eq!(
            a,
            Args {
                target: "198.18.1.2:8080".parse().unwrap(),
                kind: Kind::Udp,
                source: Some(Cidr {
                    base: u32::from(Ipv4Addr::new(198, 18, 64, 0)),
                    prefix: 18
                }),
                pps: 5000,
                duration: Duration::from_millis(500),
                count: Some(9),
                payload_bytes: 100,
                batch: 8,
                seed: Some(5),
            }
        );
        let d = parse("--target 127.0.0.1:1").unwrap();
        assert_eq!(
            (d.kind, d.pps, d.duration, d.count),
            (Kind::Syn, 0, Duration::from_secs(10), None)
        );
        assert!(matches!(parse_args(&["--help".into()]), Ok(Parsed::Help)));
        for (bad, says) in [
            ("", "--target IP:PORT is required"),
            ("--target 198.18.1.2", "is not an IPv4 address and port"),
            ("--target [::1]:80", "is not an IPv4 address and port"),
            ("--target 198.18.1.2:0", "port 0"),
            ("--target 127.0.0.1:1 --kind icmp", "neither syn nor udp"),
            (
                "--target 127.0.0.1:1 --pps fast",
                "`fast` is not a whole number",
            ),
            ("--target 127.0.0.1:1 --pps -1", "is not a whole number"),
            ("--target 127.0.0.1:1 --count 0", "at least 1"),
            ("--target 127.0.0.1:1 --duration 0s", "more than 0"),
            ("--target 127.0.0.1:1 --duration 3 days", "unknown"),
            (
                "--target 127.0.0.1:1 --source 198.18.0.1/24",
                "host bits set",
            ),
            ("--target 127.0.0.1:1 --source 198.18.0.0/33", "/1 to /32"),
            ("--target 127.0.0.1:1 --source 198.18.0.0/0", "/1 to /32"),
            (
                "--target 127.0.0.1:1 --source example",
                "not an IPv4 address",
            ),
            (
                "--target 127.0.0.1:1 --kind udp --payload-bytes 1473",
                "more than 1472",
            ),
            ("--target 127.0.0.1:1 --payload-bytes 10", "for --kind udp"),
            ("--target 127.0.0.1:1 --batch 0", "1 to 1024"),
            ("--target 127.0.0.1:1 --batch 2000", "1 to 1024"),
            ("--target 127.0.0.1:1 --count", "--count needs a value"),
            (
                "--target 127.0.0.1:1 --frobnicate",
                "unknown argument `--frobnicate`",
            ),
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains(says), "`{bad}` said `{e}`, not `{says}`");
        }
    }
}
