//! The preopened directories ([`super::super::fs`]): the resolver on its own, then every file
//! call through a guest (tests/wasi_fixtures/files.wat), then a real wasi-libc program.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;

use super::super::fs::{
    FILETYPE_DIRECTORY, FILETYPE_REGULAR_FILE, FILETYPE_SYMBOLIC_LINK, open_beneath, rights,
};
use super::*;
use crate::config::PreopenDir;

const FILES: &str = include_str!("../../../tests/wasi_fixtures/files.wat");

/// A directory tree to preopen, with a file outside it and symlinks of every kind:
///
/// ```text
/// base/outside.txt             "secret"
/// base/root/data.txt           "hello world"
/// base/root/sub/inner.txt      "inner"
/// base/root/sub/up -> ..       (back to root: still beneath)
/// base/root/sub/up2 -> ../..   (base: out)
/// base/root/link_in -> sub/inner.txt
/// base/root/link_abs -> <base>/outside.txt   (absolute)
/// base/root/link_out -> ../outside.txt       (relative, out)
/// base/root/loop_a -> loop_b, loop_b -> loop_a
/// base/root/fifo               (a FIFO)
/// ```
struct Tree {
    base: PathBuf,
    root: PathBuf,
}

impl Tree {
    fn new(tag: &str) -> Tree {
        let base = std::env::temp_dir().join(format!("spindle-fs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(base.join("outside.txt"), "secret").unwrap();
        std::fs::write(root.join("data.txt"), "hello world").unwrap();
        std::fs::write(root.join("sub/inner.txt"), "inner").unwrap();
        let link =
            |target: &Path, at: &str| std::os::unix::fs::symlink(target, root.join(at)).unwrap();
        link(Path::new(".."), "sub/up");
        link(Path::new("../.."), "sub/up2");
        link(Path::new("sub/inner.txt"), "link_in");
        link(&base.join("outside.txt"), "link_abs");
        link(Path::new("../outside.txt"), "link_out");
        link(Path::new("loop_b"), "loop_a");
        link(Path::new("loop_a"), "loop_b");
        nix::unistd::mkfifo(
            &root.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        Tree { base, root }
    }

    fn preopens(&self, guest: &str) -> Preopens {
        Preopens::open(&[PreopenDir {
            guest: guest.into(),
            host: self.root.clone(),
        }])
        .unwrap()
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

#[test]
fn the_resolver_never_leaves_the_directory() {
    let tree = Tree::new("resolver");
    let dir = std::fs::File::open(&tree.root).unwrap();
    let read = |path: &str| -> Result<String, Errno> {
        let fd = open_beneath(dir.as_fd(), path, OFlag::O_RDONLY | OFlag::O_NONBLOCK)?;
        Ok(std::fs::read_to_string(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            fd.as_raw_fd()
        }))
        .unwrap_or_default())
    };
    assert_eq!(read("data.txt"), Ok("hello world".into()));
    assert_eq!(read("sub/inner.txt"), Ok("inner".into()));
    assert_eq!(read("sub/../data.txt"), Ok("hello world".into()));
    assert_eq!(read("./sub/./inner.txt"), Ok("inner".into()));
    assert_eq!(
        read("link_in"),
        Ok("inner".into()),
        "a symlink inside is followed"
    );
    assert_eq!(read("sub/up/data.txt"), Ok("hello world".into()));
    for escape in [
        "../outside.txt",
        "sub/../../outside.txt",
        "/etc/passwd",
        "link_abs",
        "link_out",
        "sub/up2/outside.txt",
        "sub/up/../outside.txt",
    ] {
        assert_eq!(read(escape), Err(NOTCAPABLE), "{escape}");
    }
    assert_eq!(read("loop_a"), Err(LOOP));
    assert_eq!(read("missing"), Err(NOENT));
    assert_eq!(read("data.txt/x"), Err(NOTDIR));
    // A magic link (here /proc's) is refused even where it would stay in its directory.
    let proc_self = std::fs::File::open("/proc/self").unwrap();
    assert_eq!(
        open_beneath(proc_self.as_fd(), "cwd", OFlag::O_PATH).err(),
        Some(LOOP)
    );
}

struct Guest {
    h: Harness,
}

const PATH: u32 = 1024;
const OUT: u32 = 16;
const IOV: u32 = 64;
const BUF: u32 = 8192;

const READ: u64 = rights::FD_READ | rights::FD_SEEK | rights::FD_TELL | rights::FD_FILESTAT_GET;

impl Guest {
    fn new(ctx: WasiCtx) -> Guest {
        Guest {
            h: Harness::new(FILES, ctx),
        }
    }

    fn path(&self, path: &str) -> [Value; 2] {
        self.h.write(PATH, path.as_bytes());
        [i(PATH), i(path.len() as u32)]
    }

    fn open_with(
        &mut self,
        dir: u32,
        path: &str,
        lookup: u32,
        oflags: u32,
        base: u64,
        fdflags: u32,
    ) -> Result<u32, u16> {
        let [p, n] = self.path(path);
        let args = [
            i(dir),
            i(lookup),
            p,
            n,
            i(oflags),
            l(base),
            l(rights::ALL),
            i(fdflags),
            i(OUT),
        ];
        match self.h.errno("path_open", &args) {
            0 => Ok(self.h.u32_at(OUT)),
            e => Err(e as u16),
        }
    }

    fn open(&mut self, path: &str) -> Result<u32, u16> {
        self.open_with(3, path, 1, 0, READ, 0)
    }

    fn read(&mut self, fd: u32, len: u32) -> Result<Vec<u8>, u16> {
        self.h.iovec(IOV, &[(BUF, len)]);
        match self.h.errno("fd_read", &[i(fd), i(IOV), i(1), i(OUT)]) {
            0 => Ok(self.h.read(BUF, self.h.u32_at(OUT) as usize)),
            e => Err(e as u16),
        }
    }

    fn errno(&mut self, name: &str, args: &[Value]) -> u16 {
        self.h.errno(name, args) as u16
    }

    /// Every entry name of directory `fd`, read `buf_len` bytes at a time.
    fn list(&mut self, fd: u32, buf_len: u32) -> Vec<(String, u8)> {
        let mut names = Vec::new();
        let mut cookie = 0u64;
        loop {
            let e = self.errno(
                "fd_readdir",
                &[i(fd), i(BUF), i(buf_len), l(cookie), i(OUT)],
            );
            assert_eq!(e, SUCCESS);
            let used = self.h.u32_at(OUT);
            let bytes = self.h.read(BUF, used as usize);
            let mut at = 0usize;
            let mut progressed = false;
            while at + 24 <= bytes.len() {
                let next = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
                let namlen = le_u32(&bytes[at + 16..at + 20]) as usize;
                let kind = bytes[at + 20];
                if at + 24 + namlen > bytes.len() {
                    break; // cut at the buffer's end: read again from its cookie
                }
                let name = String::from_utf8(bytes[at + 24..at + 24 + namlen].to_vec()).unwrap();
                names.push((name, kind));
                cookie = next;
                progressed = true;
                at += 24 + namlen;
            }
            if used < buf_len {
                break;
            }
            assert!(progressed, "a {buf_len}-byte buffer holds no whole entry");
        }
        names.sort();
        names
    }
}

fn files_ctx(preopens: Preopens) -> WasiCtx {
    WasiCtx::new("files", vec!["files".into()], vec![]).with_preopens(preopens)
}

#[test]
fn preopens_are_named_from_fd_3_and_end_with_badf() {
    let tree = Tree::new("prestat");
    let two = Preopens::open(&[
        PreopenDir {
            guest: "/data".into(),
            host: tree.root.clone(),
        },
        PreopenDir {
            guest: "/".into(),
            host: tree.root.join("sub"),
        },
    ])
    .unwrap();
    let mut g = Guest::new(files_ctx(two));
    for (fd, name) in [(3, "/data"), (4, "/")] {
        assert_eq!(g.errno("fd_prestat_get", &[i(fd), i(OUT)]), SUCCESS);
        assert_eq!(g.h.read(OUT, 1), [0], "tag: directory");
        assert_eq!(g.h.u32_at(OUT + 4), name.len() as u32);
        let n = name.len() as u32;
        assert_eq!(
            g.errno("fd_prestat_dir_name", &[i(fd), i(BUF), i(n)]),
            SUCCESS
        );
        assert_eq!(g.h.read(BUF, name.len()), name.as_bytes());
        if n > 1 {
            assert_eq!(
                g.errno("fd_prestat_dir_name", &[i(fd), i(BUF), i(n - 1)]),
                NAMETOOLONG
            );
        }
        assert_eq!(g.errno("fd_fdstat_get", &[i(fd), i(BUF)]), SUCCESS);
        assert_eq!(g.h.read(BUF, 1), [FILETYPE_DIRECTORY]);
        assert_eq!(g.h.u64_at(BUF + 8), rights::DIRECTORY);
        assert_eq!(
            g.h.u64_at(BUF + 16),
            rights::ALL,
            "asks for writes to refuse them"
        );
    }
    for fd in [0, 1, 2, 5, 100] {
        assert_eq!(g.errno("fd_prestat_get", &[i(fd), i(OUT)]), BADF, "fd {fd}");
    }
    // The second preopen is its own directory.
    assert_eq!(
        g.open_with(4, "inner.txt", 1, 0, READ, 0).map(|_| ()),
        Ok(())
    );
    assert_eq!(g.open_with(4, "data.txt", 1, 0, READ, 0), Err(NOENT));
}

#[test]
fn files_beneath_a_preopen_read_seek_and_stat() {
    let tree = Tree::new("read");
    let mut g = Guest::new(files_ctx(tree.preopens("/data")));
    let fd = g.open("data.txt").unwrap();
    assert_eq!(fd, 4, "the lowest free fd");
    assert_eq!(g.read(fd, 5).unwrap(), b"hello");
    assert_eq!(g.errno("fd_tell", &[i(fd), i(OUT)]), SUCCESS);
    assert_eq!(g.h.u64_at(OUT), 5);
    assert_eq!(g.read(fd, 100).unwrap(), b" world");
    assert_eq!(g.read(fd, 100).unwrap(), b"", "EOF");
    // SET 6, then END -5: preview 1 numbers whence SET, CUR, END.
    assert_eq!(g.errno("fd_seek", &[i(fd), l(6), i(0), i(OUT)]), SUCCESS);
    assert_eq!(g.read(fd, 100).unwrap(), b"world");
    assert_eq!(
        g.errno("fd_seek", &[i(fd), l(-5i64 as u64), i(2), i(OUT)]),
        SUCCESS
    );
    assert_eq!(g.h.u64_at(OUT), 6);
    // wasi_unstable numbered them CUR, END, SET: 2 is SET.
    assert_eq!(g.errno("u_fd_seek", &[i(fd), l(1), i(2), i(OUT)]), SUCCESS);
    assert_eq!(g.read(fd, 4).unwrap(), b"ello");
    assert_eq!(g.errno("fd_seek", &[i(fd), l(0), i(3), i(OUT)]), INVAL);
    // pread leaves the offset where it was.
    g.h.iovec(IOV, &[(BUF, 3)]);
    assert_eq!(
        g.errno("fd_pread", &[i(fd), i(IOV), i(1), l(8), i(OUT)]),
        SUCCESS
    );
    assert_eq!(g.h.read(BUF, g.h.u32_at(OUT) as usize), b"rld");
    assert_eq!(g.read(fd, 2).unwrap(), b" w");
    // Stat through the fd and through the path (preview 1: size @32; preview 0: @24).
    assert_eq!(g.errno("fd_filestat_get", &[i(fd), i(BUF)]), SUCCESS);
    assert_eq!(g.h.read(BUF + 16, 1), [FILETYPE_REGULAR_FILE]);
    assert_eq!(g.h.u64_at(BUF + 32), 11);
    let [p, n] = g.path("link_in");
    assert_eq!(
        g.errno(
            "path_filestat_get",
            &[i(3), i(1), p.clone(), n.clone(), i(BUF)]
        ),
        SUCCESS
    );
    assert_eq!(
        (g.h.read(BUF + 16, 1)[0], g.h.u64_at(BUF + 32)),
        (FILETYPE_REGULAR_FILE, 5)
    );
    assert_eq!(
        g.errno(
            "path_filestat_get",
            &[i(3), i(0), p.clone(), n.clone(), i(BUF)]
        ),
        SUCCESS
    );
    assert_eq!(
        g.h.read(BUF + 16, 1),
        [FILETYPE_SYMBOLIC_LINK],
        "not followed"
    );
    assert_eq!(
        g.errno("u_path_filestat_get", &[i(3), i(1), p, n, i(BUF)]),
        SUCCESS
    );
    assert_eq!(
        (g.h.read(BUF + 16, 1)[0], g.h.u64_at(BUF + 24)),
        (FILETYPE_REGULAR_FILE, 5)
    );
    let [p, n] = g.path("link_in");
    assert_eq!(
        g.errno("path_readlink", &[i(3), p, n, i(BUF), i(64), i(OUT)]),
        SUCCESS
    );
    assert_eq!(g.h.read(BUF, g.h.u32_at(OUT) as usize), b"sub/inner.txt");
    // The fd has the read rights it asked for, and no more.
    assert_eq!(g.errno("fd_fdstat_get", &[i(fd), i(BUF)]), SUCCESS);
    assert_eq!(g.h.read(BUF, 1), [FILETYPE_REGULAR_FILE]);
    assert_eq!(g.h.u64_at(BUF + 8), READ);
    assert_eq!(g.errno("fd_sync", &[i(fd)]), SUCCESS, "nothing to sync");
    assert_eq!(
        g.errno("fd_advise", &[i(fd), l(0), l(0), i(1)]),
        NOTCAPABLE,
        "not asked for"
    );
    assert_eq!(g.errno("sock_accept", &[i(fd), i(0), i(OUT)]), NOTCAPABLE);
    assert_eq!(
        g.errno("fd_fdstat_set_rights", &[i(fd), l(rights::FD_READ), l(0)]),
        SUCCESS
    );
    assert_eq!(g.errno("fd_seek", &[i(fd), l(0), i(0), i(OUT)]), NOTCAPABLE);
    assert_eq!(
        g.errno("fd_fdstat_set_rights", &[i(fd), l(READ), l(0)]),
        NOTCAPABLE,
        "rights only shrink"
    );
    let advised = g
        .open_with(3, "data.txt", 1, 0, READ | rights::FD_ADVISE, 0)
        .unwrap();
    assert_eq!(
        g.errno("fd_advise", &[i(advised), l(0), l(0), i(1)]),
        SUCCESS
    );
    assert_eq!(g.errno("fd_advise", &[i(advised), l(0), l(0), i(9)]), INVAL);
    // poll_oneoff: a file is ready to read what is left of it, and never to write.
    let asked = READ | rights::POLL_FD_READWRITE;
    let polled = g.open_with(3, "data.txt", 1, 0, asked, 0).unwrap();
    assert_eq!(g.read(polled, 4).unwrap(), b"hell");
    fd_sub(&g.h, BUF, 1, EVENTTYPE_FD_READ, polled);
    fd_sub(&g.h, BUF + 48, 2, EVENTTYPE_FD_WRITE, polled);
    assert_eq!(
        g.errno("poll_oneoff", &[i(BUF), i(BUF + 200), i(2), i(OUT)]),
        SUCCESS
    );
    assert_eq!(g.h.u32_at(OUT), 2);
    assert_eq!(
        event(&g.h, BUF + 200),
        (1, SUCCESS, EVENTTYPE_FD_READ, 7, 0)
    );
    assert_eq!(event(&g.h, BUF + 232).1, BADF);
    // A directory opened beneath is a directory, and paths resolve beneath it in turn.
    let sub = g
        .open_with(3, "sub", 1, 2, rights::PATH_OPEN | rights::FD_READDIR, 0)
        .unwrap();
    assert_eq!(
        g.open_with(sub, "inner.txt", 1, 0, READ, 0).map(|_| ()),
        Ok(())
    );
    assert_eq!(
        g.open_with(sub, "../data.txt", 1, 0, READ, 0),
        Err(NOTCAPABLE)
    );
    assert_eq!(g.read(sub, 4), Err(ISDIR));
    assert_eq!(
        g.open_with(3, "data.txt", 1, 2, READ, 0),
        Err(NOTDIR),
        "O_DIRECTORY"
    );
    // Closed is closed; the number is given out again.
    assert_eq!(g.errno("fd_close", &[i(fd)]), SUCCESS);
    assert_eq!(g.read(fd, 1), Err(BADF));
    assert_eq!(g.errno("fd_close", &[i(fd)]), BADF);
    assert_eq!(g.open("data.txt"), Ok(fd));
}

#[test]
fn nothing_outside_the_directory_can_be_opened_or_stat() {
    let tree = Tree::new("escape");
    let mut g = Guest::new(files_ctx(tree.preopens("/data")));
    for escape in [
        "../outside.txt",
        "/etc/passwd",
        "link_abs",
        "link_out",
        "sub/up2/outside.txt",
    ] {
        assert_eq!(g.open(escape), Err(NOTCAPABLE), "{escape}");
        let [p, n] = g.path(escape);
        assert_eq!(
            g.errno("path_filestat_get", &[i(3), i(1), p, n, i(BUF)]),
            NOTCAPABLE,
            "stat {escape}"
        );
    }
    assert_eq!(g.open("loop_a"), Err(LOOP));
    assert_eq!(g.open("missing"), Err(NOENT));
    assert_eq!(
        g.open_with(3, "link_in", 0, 0, READ, 0),
        Err(LOOP),
        "no follow"
    );
    assert_eq!(g.open("fifo"), Err(NOTSUP), "only files and directories");
    assert_eq!(g.open(""), Err(NOENT));
    g.h.write(PATH, b"a\0b");
    let args = [i(3), i(1), i(PATH), i(3), i(0), l(READ), l(0), i(0), i(OUT)];
    assert_eq!(g.errno("path_open", &args), INVAL);
    // Out-of-bounds guest pointers fault, as everywhere.
    let args = [
        i(3),
        i(1),
        i(u32::MAX - 2),
        i(8),
        i(0),
        l(READ),
        l(0),
        i(0),
        i(OUT),
    ];
    assert_eq!(g.errno("path_open", &args), FAULT);
    // Stdio and unknown fds are no directories.
    assert_eq!(g.open_with(0, "data.txt", 1, 0, READ, 0), Err(NOTCAPABLE));
    assert_eq!(g.open_with(9, "data.txt", 1, 0, READ, 0), Err(BADF));
}

#[test]
fn nothing_can_be_written_created_or_removed() {
    let tree = Tree::new("write");
    let mut g = Guest::new(files_ctx(tree.preopens("/data")));
    const CREAT: u32 = 1;
    const TRUNC: u32 = 8;
    const APPEND: u32 = 1;
    assert_eq!(g.open_with(3, "new.txt", 1, CREAT, READ, 0), Err(ROFS));
    assert_eq!(g.open_with(3, "data.txt", 1, TRUNC, READ, 0), Err(ROFS));
    assert_eq!(g.open_with(3, "data.txt", 1, 0, READ, APPEND), Err(ROFS));
    for write in [
        rights::FD_WRITE,
        rights::FD_DATASYNC,
        rights::FD_ALLOCATE,
        rights::FD_FILESTAT_SET_SIZE,
    ] {
        assert_eq!(g.open_with(3, "data.txt", 1, 0, READ | write, 0), Err(ROFS));
    }
    let fd = g.open("data.txt").unwrap();
    g.h.write(BUF, b"XXXX");
    g.h.iovec(IOV, &[(BUF, 4)]);
    assert_eq!(g.errno("fd_write", &[i(fd), i(IOV), i(1), i(OUT)]), BADF);
    assert_eq!(g.errno("fd_filestat_set_size", &[i(fd), l(0)]), BADF);
    let [p, n] = g.path("sub");
    for call in [
        "path_create_directory",
        "path_remove_directory",
        "path_unlink_file",
    ] {
        assert_eq!(g.errno(call, &[i(3), p.clone(), n.clone()]), ROFS, "{call}");
    }
    assert_eq!(
        g.errno(
            "path_rename",
            &[i(3), p.clone(), n.clone(), i(3), p.clone(), n.clone()]
        ),
        ROFS
    );
    assert_eq!(
        g.errno(
            "path_symlink",
            &[p.clone(), n.clone(), i(3), p.clone(), n.clone()]
        ),
        ROFS
    );
    assert_eq!(
        g.errno(
            "path_filestat_set_times",
            &[i(3), i(1), p.clone(), n.clone(), l(0), l(0), i(0)]
        ),
        ROFS
    );
    // On a file's fd the path calls find no directory.
    assert_eq!(g.errno("path_create_directory", &[i(fd), p, n]), NOTDIR);
    let mut entries: Vec<String> = std::fs::read_dir(&tree.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        [
            "data.txt", "fifo", "link_abs", "link_in", "link_out", "loop_a", "loop_b", "sub"
        ],
        "the directory is as it was"
    );
    assert_eq!(
        std::fs::read_to_string(tree.root.join("data.txt")).unwrap(),
        "hello world"
    );
}

#[test]
fn directories_list_in_any_buffer_size() {
    let tree = Tree::new("readdir");
    for i in 0..40 {
        std::fs::write(tree.root.join(format!("file-{i:02}-{}", "x".repeat(i))), "").unwrap();
    }
    let mut expected: Vec<(String, u8)> = std::fs::read_dir(&tree.root)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let kind = match e.file_type().unwrap() {
                t if t.is_dir() => FILETYPE_DIRECTORY,
                t if t.is_symlink() => FILETYPE_SYMBOLIC_LINK,
                t if t.is_file() => FILETYPE_REGULAR_FILE,
                _ => 0,
            };
            (e.file_name().into_string().unwrap(), kind)
        })
        .collect();
    expected.push((".".into(), FILETYPE_DIRECTORY));
    expected.push(("..".into(), FILETYPE_DIRECTORY));
    expected.sort();
    let mut g = Guest::new(files_ctx(tree.preopens("/data")));
    // The preopen itself, and a directory opened beneath it (wasi-libc's opendir).
    let dir = g.open_with(3, ".", 1, 2, rights::FD_READDIR, 0).unwrap();
    for buf_len in [80, 100, 333, 4096, 60_000] {
        assert_eq!(g.list(3, buf_len), expected, "preopen, buffer {buf_len}");
        assert_eq!(g.list(dir, buf_len), expected, "opened, buffer {buf_len}");
    }
    let file = g.open("data.txt").unwrap();
    let e = g.errno("fd_readdir", &[i(file), i(BUF), i(100), l(0), i(OUT)]);
    assert_eq!(e, NOTDIR);
    let e = g.errno("fd_readdir", &[i(1), i(BUF), i(100), l(0), i(OUT)]);
    assert_eq!(e, NOTCAPABLE);
}

#[test]
fn a_reset_closes_what_a_request_opened_and_gives_the_preopens_back() {
    let tree = Tree::new("reset");
    let mut g = Guest::new(files_ctx(tree.preopens("/data")));
    assert_eq!(g.h.ctx().files_as_started(), Ok(()));
    let fd = g.open("data.txt").unwrap();
    assert_eq!(
        g.h.ctx().files_as_started(),
        Err(
            "1 file(s) or directories open, 0 of 1 preopened directories closed, moved or changed"
                .into()
        )
    );
    assert_eq!(g.errno("fd_renumber", &[i(fd), i(3)]), SUCCESS);
    assert_eq!(
        g.errno("fd_prestat_get", &[i(3), i(OUT)]),
        BADF,
        "3 is the file now"
    );
    assert_eq!(g.read(3, 5).unwrap(), b"hello");
    assert!(g.h.ctx().files_as_started().is_err());
    g.h.ctx().reset_for_request([false; 3]);
    assert_eq!(g.h.ctx().files_as_started(), Ok(()));
    assert_eq!(g.read(fd, 1), Err(BADF));
    assert_eq!(g.errno("fd_prestat_get", &[i(3), i(OUT)]), SUCCESS);
    assert_eq!(g.open("data.txt"), Ok(4));
    assert_eq!(
        g.errno("fd_renumber", &[i(4), i(0)]),
        NOTCAPABLE,
        "stdio stays"
    );
    assert_eq!(g.errno("fd_renumber", &[i(4), i(50)]), BADF);
}

#[test]
fn an_instance_opens_at_most_so_many_files() {
    let tree = Tree::new("limit");
    let mut g = Guest::new(files_ctx(tree.preopens("/data")));
    for _ in 1..super::super::fs::MAX_OPEN_FDS {
        g.open("data.txt").unwrap();
    }
    assert_eq!(g.open("data.txt"), Err(MFILE));
}

const C_FILES: &str = r#"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    char buf[64] = {0};
    FILE *f = fopen("/data/data.txt", "r");
    if (!f) { printf("fopen: %s\n", strerror(errno)); return 1; }
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    printf("read %zu: %s\n", n, buf);
    struct stat st;
    printf("stat: %d size %lld dir %d\n", stat("/data/sub/inner.txt", &st), (long long)st.st_size,
           stat("/data/sub", &st) == 0 && S_ISDIR(st.st_mode));
    DIR *d = opendir("/data/sub");
    int entries = 0;
    for (struct dirent *e; d && (e = readdir(d));) entries += strcmp(e->d_name, "inner.txt") == 0;
    if (d) closedir(d);
    printf("inner listed %d\n", entries);
    errno = 0;
    printf("write: %d %s\n", fopen("/data/new.txt", "w") == NULL, strerror(errno));
    errno = 0;
    printf("append: %d %s\n", open("/data/data.txt", O_WRONLY | O_APPEND) < 0, strerror(errno));
    errno = 0;
    printf("mkdir: %d %s\n", mkdir("/data/d", 0755), strerror(errno));
    errno = 0;
    printf("unlink: %d %s\n", unlink("/data/data.txt"), strerror(errno));
    errno = 0;
    printf("escape: %d %s\n", open("/data/../outside.txt", O_RDONLY) < 0, strerror(errno));
    errno = 0;
    printf("symlink out: %d %s\n", open("/data/link_out", O_RDONLY) < 0, strerror(errno));
    errno = 0;
    printf("elsewhere: %d %s\n", open("/etc/passwd", O_RDONLY) < 0, strerror(errno));
    printf("argv: %s %s\n", argv[0], argc > 1 ? argv[1] : "-");
    return 0;
}
"#;

/// wasi-libc's own file functions (fopen, fread, stat, opendir/readdir, open, mkdir, unlink)
/// against a preopen: what real C modules call.
#[test]
fn wasi_libc_reads_files_beneath_its_preopens_and_writes_none() {
    let dir = scratch_dir("libc-files");
    let src = dir.join("files.c");
    let wasm = dir.join("files.wasm");
    std::fs::write(&src, C_FILES).unwrap();
    let built = std::process::Command::new("clang")
        .args(["--target=wasm32-wasi", "-O2", "-o"])
        .arg(&wasm)
        .arg(&src)
        .output();
    let bytes = match built {
        Ok(out) if out.status.success() => std::fs::read(&wasm).unwrap(),
        Ok(out) => panic!("clang failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => {
            testkit::cannot_run(
                "wasi_libc_reads_files_beneath_its_preopens_and_writes_none",
                format!(
                    "`clang --target=wasm32-wasi` is not available ({e}; scripts/setup.sh installs it)"
                ),
            );
            return;
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    let tree = Tree::new("libc");
    let mut c = WasiCtx::new("files", vec!["files".into(), "arg".into()], vec![])
        .with_preopens(tree.preopens("/data"));
    c.capture_stdout(4096);
    let mut h = Harness::from_bytes(&bytes, c);
    match h.call("_start", &[]) {
        Ok(_) => {}
        Err(e) => assert_eq!(e.downcast_ref::<ProcExit>(), Some(&ProcExit(0)), "{e}"),
    }
    let stdout = String::from_utf8(h.ctx().take_stdout()).unwrap();
    assert_eq!(
        stdout,
        "read 11: hello world\n\
         stat: 0 size 5 dir 1\n\
         inner listed 1\n\
         write: 1 Read-only file system\n\
         append: 1 Read-only file system\n\
         mkdir: -1 Read-only file system\n\
         unlink: -1 Read-only file system\n\
         escape: 1 Capabilities insufficient\n\
         symlink out: 1 Capabilities insufficient\n\
         elsewhere: 1 Capabilities insufficient\n\
         argv: files arg\n"
    );
    assert_eq!(
        std::fs::read_to_string(tree.root.join("data.txt")).unwrap(),
        "hello world"
    );
    assert!(!tree.root.join("new.txt").exists() && !tree.root.join("d").exists());
}
