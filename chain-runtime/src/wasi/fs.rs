//! The guest's fds above stdio: its preopened directories (`files:`, fds `3..3 + n`) and what
//! it opened beneath them, read-only.
//!
//! Every guest path is resolved by the kernel beneath a directory fd the host holds
//! ([`open_beneath`]: `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`), never as a
//! string: `..` past the directory, absolute paths, absolute symlinks and relative symlinks
//! that lead out all fail (`NOTCAPABLE`), whatever the guest does between two calls and
//! whatever the directory's contents do meanwhile (no check-then-use). Nothing is ever
//! written: opens that ask to write, create, truncate or append get `ROFS`, as do the path
//! calls that would change the directory; writes through an fd opened here get `BADF`
//! (not open for writing).
//!
//! Rights follow WASI's model: a directory's fds advertise every right as inheritable, so
//! a guest asks for what it means to do (wasi-libc and Rust std ask for write rights only
//! when opening to write) and is told `ROFS` for the writes rather than being handed an fd
//! that fails later; an fd gets the read rights it asked for, and a call its rights do not
//! cover gets `NOTCAPABLE`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno as HostErrno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2, readlinkat};
use nix::sys::stat::{FileStat, SFlag, fstat};
use nix::unistd::{Whence, lseek};

use super::errno::*;
use super::memory::{Mem, iovecs};
use super::preopen::Preopens;
use super::{COPY_CHUNK, Errno, Flavor};

pub(super) const FILETYPE_UNKNOWN: u8 = 0;
pub(super) const FILETYPE_BLOCK_DEVICE: u8 = 1;
pub(super) const FILETYPE_CHARACTER_DEVICE: u8 = 2;
pub(super) const FILETYPE_DIRECTORY: u8 = 3;
pub(super) const FILETYPE_REGULAR_FILE: u8 = 4;
pub(super) const FILETYPE_SOCKET_STREAM: u8 = 6;
pub(super) const FILETYPE_SYMBOLIC_LINK: u8 = 7;

pub(super) mod rights {
    pub const FD_DATASYNC: u64 = 1 << 0;
    pub const FD_READ: u64 = 1 << 1;
    pub const FD_SEEK: u64 = 1 << 2;
    pub const FD_FDSTAT_SET_FLAGS: u64 = 1 << 3;
    pub const FD_SYNC: u64 = 1 << 4;
    pub const FD_TELL: u64 = 1 << 5;
    pub const FD_WRITE: u64 = 1 << 6;
    pub const FD_ADVISE: u64 = 1 << 7;
    pub const FD_ALLOCATE: u64 = 1 << 8;
    pub const PATH_OPEN: u64 = 1 << 13;
    pub const FD_READDIR: u64 = 1 << 14;
    pub const PATH_READLINK: u64 = 1 << 15;
    pub const PATH_FILESTAT_GET: u64 = 1 << 18;
    pub const FD_FILESTAT_GET: u64 = 1 << 21;
    pub const FD_FILESTAT_SET_SIZE: u64 = 1 << 22;
    pub const POLL_FD_READWRITE: u64 = 1 << 27;
    /// Every right preview 1 defines (bits 0 to 29).
    pub const ALL: u64 = (1 << 30) - 1;
    /// What wasi-libc and Rust std ask for only when opening to write: a `path_open` asking
    /// for any of them is refused with `ROFS`.
    pub const WRITE: u64 = FD_WRITE | FD_DATASYNC | FD_ALLOCATE | FD_FILESTAT_SET_SIZE;
    /// The most a directory fd holds: open, list, stat and read links beneath it.
    pub const DIRECTORY: u64 = PATH_OPEN
        | FD_READDIR
        | PATH_READLINK
        | PATH_FILESTAT_GET
        | FD_FILESTAT_GET
        | FD_FDSTAT_SET_FLAGS
        | FD_SYNC
        | FD_ADVISE;
    /// The most a regular file's fd holds: read it.
    pub const FILE: u64 = FD_READ
        | FD_SEEK
        | FD_TELL
        | FD_ADVISE
        | FD_FILESTAT_GET
        | FD_FDSTAT_SET_FLAGS
        | FD_SYNC
        | POLL_FD_READWRITE;
}

const LOOKUP_SYMLINK_FOLLOW: u32 = 1;
const OFLAGS_CREAT: u32 = 1;
const OFLAGS_DIRECTORY: u32 = 2;
const OFLAGS_EXCL: u32 = 4;
const OFLAGS_TRUNC: u32 = 8;
const FDFLAGS_APPEND: u32 = 1;
const FDFLAGS_NONBLOCK: u16 = 4;

/// Longest guest path, as Linux's PATH_MAX.
const PATH_MAX: u32 = 4096;
/// Fds above stdio one instance may have open at once (its preopens included).
pub const MAX_OPEN_FDS: usize = 256;
/// Bytes of directory entries read from the kernel per `getdents64`.
const DIRENT_CHUNK: usize = 16 * 1024;
/// A preview-1 `dirent`: d_next u64, d_ino u64, d_namlen u32, d_type u8, 3 bytes padding.
const DIRENT_HEADER: usize = 24;

/// What an fd above stdio is.
#[derive(Debug)]
enum Kind {
    /// The `i`-th preopened directory.
    Preopen(usize),
    /// A directory opened beneath one (`O_RDONLY | O_DIRECTORY`, so it can be listed).
    Dir(OwnedFd),
    /// A regular file, open for reading.
    File(OwnedFd),
}

#[derive(Debug)]
struct Entry {
    kind: Kind,
    rights: u64,
    inheriting: u64,
    /// fdflags as the guest set them (only NONBLOCK, which regular files ignore).
    flags: u16,
}

/// The guest's fds above stdio.
#[derive(Debug, Default)]
pub(super) struct FdTable {
    preopens: Preopens,
    entries: BTreeMap<u32, Entry>,
}

impl FdTable {
    pub(super) fn new(preopens: Preopens) -> Self {
        let mut table = FdTable {
            preopens,
            entries: BTreeMap::new(),
        };
        table.reset();
        table
    }

    /// Back to what a new instance has: every preopen at its fd, nothing else open.
    pub(super) fn reset(&mut self) {
        self.entries.clear();
        for i in 0..self.preopens.len() {
            self.entries.insert(3 + i as u32, preopen_entry(i));
        }
    }

    /// True when the table is as [`FdTable::reset`] leaves it: what an image can carry, since
    /// a child rebuilds exactly that.
    pub(super) fn is_initial(&self) -> bool {
        self.entries.len() == self.preopens.len()
            && self.entries.iter().enumerate().all(|(i, (fd, e))| {
                *fd == 3 + i as u32
                    && matches!(e.kind, Kind::Preopen(p) if p == i)
                    && e.rights == rights::DIRECTORY
                    && e.inheriting == rights::ALL
                    && e.flags == 0
            })
    }

    /// How the table differs from a new instance's, for a refusal to capture it.
    pub(super) fn describe_changes(&self) -> String {
        let opened = self
            .entries
            .values()
            .filter(|e| !matches!(e.kind, Kind::Preopen(_)))
            .count();
        let preopens = self
            .entries
            .values()
            .filter(|e| matches!(e.kind, Kind::Preopen(_)))
            .count();
        format!(
            "{opened} file(s) or directories open, {} of {} preopened directories closed, moved or changed",
            self.preopens.len() - preopens.min(self.preopens.len()),
            self.preopens.len()
        )
    }

    pub(super) fn preopens(&self) -> &Preopens {
        &self.preopens
    }

    fn entry(&self, fd: u32) -> Result<&Entry, Errno> {
        self.entries.get(&fd).ok_or(BADF)
    }

    fn entry_mut(&mut self, fd: u32) -> Result<&mut Entry, Errno> {
        self.entries.get_mut(&fd).ok_or(BADF)
    }

    /// The host fd behind `entry`.
    fn host<'a>(&'a self, entry: &'a Entry) -> BorrowedFd<'a> {
        match &entry.kind {
            Kind::Preopen(i) => self
                .preopens
                .get(*i)
                .expect("preopen entries index the table's own preopens")
                .dir
                .as_fd(),
            Kind::Dir(fd) | Kind::File(fd) => fd.as_fd(),
        }
    }

    /// A directory fd with `right`: the host fd to resolve paths beneath.
    fn dir_with(&self, fd: u32, right: u64) -> Result<BorrowedFd<'_>, Errno> {
        let entry = self.entry(fd)?;
        if matches!(entry.kind, Kind::File(_)) {
            return Err(NOTDIR);
        }
        if entry.rights & right == 0 {
            return Err(NOTCAPABLE);
        }
        Ok(self.host(entry))
    }

    /// A regular file's fd with `right`.
    fn file_with(&self, fd: u32, right: u64) -> Result<BorrowedFd<'_>, Errno> {
        let entry = self.entry(fd)?;
        if !matches!(entry.kind, Kind::File(_)) {
            return Err(ISDIR);
        }
        if entry.rights & right == 0 {
            return Err(NOTCAPABLE);
        }
        Ok(self.host(entry))
    }

    fn insert(&mut self, entry: Entry) -> Result<u32, Errno> {
        if self.entries.len() >= MAX_OPEN_FDS {
            return Err(MFILE);
        }
        // The lowest free number, as POSIX hands out.
        let mut fd = 3u32;
        for &taken in self.entries.keys() {
            if taken != fd {
                break;
            }
            fd += 1;
        }
        self.entries.insert(fd, entry);
        Ok(fd)
    }

    pub(super) fn close(&mut self, fd: u32) -> Result<(), Errno> {
        self.entries.remove(&fd).map(drop).ok_or(BADF)
    }

    pub(super) fn renumber(&mut self, from: u32, to: u32) -> Result<(), Errno> {
        if !self.entries.contains_key(&from) || !self.entries.contains_key(&to) {
            return Err(BADF);
        }
        if from != to {
            let entry = self.entries.remove(&from).expect("checked above");
            self.entries.insert(to, entry);
        }
        Ok(())
    }

    pub(super) fn prestat_get(&self, mem: &Mem<'_>, fd: u32, buf: u32) -> Result<(), Errno> {
        let name = self.preopen_name(fd)?;
        // prestat: tag u8 @0 (0 = directory), pr_name_len u32 @4.
        let mut out = [0u8; 8];
        out[4..8].copy_from_slice(&(name.len() as u32).to_le_bytes());
        mem.write(buf, &out)
    }

    pub(super) fn prestat_dir_name(
        &self,
        mem: &Mem<'_>,
        fd: u32,
        path: u32,
        len: u32,
    ) -> Result<(), Errno> {
        let name = self.preopen_name(fd)?;
        if (len as usize) < name.len() {
            return Err(NAMETOOLONG);
        }
        mem.write(path, name.as_bytes())
    }

    fn preopen_name(&self, fd: u32) -> Result<&str, Errno> {
        match self.entries.get(&fd).map(|e| &e.kind) {
            Some(Kind::Preopen(i)) => Ok(&self.preopens.get(*i).expect("own preopen").guest),
            _ => Err(BADF),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn path_open(
        &mut self,
        mem: &Mem<'_>,
        dirfd: u32,
        lookup: u32,
        path: u32,
        path_len: u32,
        oflags: u32,
        base: u64,
        inheriting: u64,
        fdflags: u32,
        opened: u32,
    ) -> Result<(), Errno> {
        let dir = self.dir_with(dirfd, rights::PATH_OPEN)?;
        let path = guest_path(mem, path, path_len)?;
        mem.check(opened, 4u64)?;
        if oflags & (OFLAGS_CREAT | OFLAGS_TRUNC | OFLAGS_EXCL) != 0
            || fdflags & FDFLAGS_APPEND != 0
            || base & rights::WRITE != 0
        {
            return Err(ROFS);
        }
        let mut flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
        if oflags & OFLAGS_DIRECTORY != 0 {
            flags |= OFlag::O_DIRECTORY;
        }
        if lookup & LOOKUP_SYMLINK_FOLLOW == 0 {
            flags |= OFlag::O_NOFOLLOW;
        }
        let fd = open_beneath(dir, OsStr::from_bytes(&path), flags)?;
        let st = fstat(&fd).map_err(from_host)?;
        let (kind, most) = match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFDIR => (Kind::Dir(fd), rights::DIRECTORY),
            SFlag::S_IFREG => (Kind::File(fd), rights::FILE),
            // Devices, FIFOs and sockets are no files to read a function's data from.
            _ => return Err(NOTSUP),
        };
        let new = self.insert(Entry {
            kind,
            rights: base & most,
            inheriting: inheriting & rights::ALL,
            flags: (fdflags as u16) & FDFLAGS_NONBLOCK,
        })?;
        mem.write_u32(opened, new)
    }

    /// `fd_read` (`offset` None) or `fd_pread` on a file.
    pub(super) fn read(
        &self,
        mem: &Mem<'_>,
        fd: u32,
        iovs: u32,
        iovs_len: u32,
        offset: Option<u64>,
        nread: u32,
    ) -> Result<(), Errno> {
        let right = if offset.is_some() {
            rights::FD_READ | rights::FD_SEEK
        } else {
            rights::FD_READ
        };
        let entry = self.entry(fd)?;
        if !matches!(entry.kind, Kind::File(_)) {
            return Err(ISDIR);
        }
        if entry.rights & right != right {
            return Err(NOTCAPABLE);
        }
        let file = self.host(entry);
        let mut at = match offset {
            Some(o) => Some(i64::try_from(o).map_err(|_| INVAL)?),
            None => None,
        };
        let bufs = iovecs(mem, iovs, iovs_len)?;
        mem.check(nread, 4u64)?;
        let mut chunk = vec![0u8; COPY_CHUNK as usize];
        let mut total = 0u32;
        'bufs: for (ptr, len) in bufs {
            let mut done = 0u32;
            while done < len {
                let want = ((len - done) as usize).min(chunk.len());
                let got = match at {
                    Some(o) => nix::sys::uio::pread(file, &mut chunk[..want], o),
                    None => nix::unistd::read(file, &mut chunk[..want]),
                };
                let got = match got {
                    Ok(n) => n,
                    Err(HostErrno::EINTR) => continue,
                    // What was read so far is the result; an error on the first byte is.
                    Err(e) if total == 0 => return Err(from_host(e)),
                    Err(_) => break 'bufs,
                };
                if got == 0 {
                    break 'bufs;
                }
                mem.write(u64::from(ptr) + u64::from(done), &chunk[..got])?;
                done += got as u32;
                total += got as u32;
                if let Some(o) = at.as_mut() {
                    *o += got as i64;
                }
                if got < want {
                    break 'bufs;
                }
            }
        }
        mem.write_u32(nread, total)
    }

    /// Writing to an fd of this table: none is open for writing.
    pub(super) fn write(&self, fd: u32) -> Result<(), Errno> {
        self.entry(fd)?;
        Err(BADF)
    }

    /// `fd_seek` with `whence` as host `Whence`; `tell` is SEEK_CUR by 0.
    pub(super) fn seek(
        &self,
        mem: &Mem<'_>,
        fd: u32,
        offset: i64,
        whence: Whence,
        result: u32,
    ) -> Result<(), Errno> {
        // A tell (0 from the current offset) needs either right, a seek FD_SEEK.
        let needs = if offset == 0 && matches!(whence, Whence::SeekCur) {
            rights::FD_TELL | rights::FD_SEEK
        } else {
            rights::FD_SEEK
        };
        let entry = self.entry(fd)?;
        if entry.rights & needs == 0 {
            return Err(NOTCAPABLE);
        }
        if !matches!(entry.kind, Kind::File(_)) {
            // Directories are read by cookie (fd_readdir), not by offset.
            return Err(BADF);
        }
        mem.check(result, 8u64)?;
        let at = lseek(self.host(entry), offset, whence).map_err(from_host)?;
        mem.write_u64(result, at as u64)
    }

    pub(super) fn fdstat_get(&self, mem: &Mem<'_>, fd: u32, stat: u32) -> Result<(), Errno> {
        let entry = self.entry(fd)?;
        // fdstat: filetype u8 @0, flags u16 @2, rights_base u64 @8, rights_inheriting u64 @16.
        let mut buf = [0u8; 24];
        buf[0] = match entry.kind {
            Kind::File(_) => FILETYPE_REGULAR_FILE,
            Kind::Dir(_) | Kind::Preopen(_) => FILETYPE_DIRECTORY,
        };
        buf[2..4].copy_from_slice(&entry.flags.to_le_bytes());
        buf[8..16].copy_from_slice(&entry.rights.to_le_bytes());
        buf[16..24].copy_from_slice(&entry.inheriting.to_le_bytes());
        mem.write(stat, &buf)
    }

    pub(super) fn fdstat_set_flags(&mut self, fd: u32, flags: u32) -> Result<(), Errno> {
        let entry = self.entry_mut(fd)?;
        if entry.rights & rights::FD_FDSTAT_SET_FLAGS == 0 {
            return Err(NOTCAPABLE);
        }
        match flags {
            0 => entry.flags = 0,
            // Regular files and directories never block: nothing changes but what fdstat says.
            f if f == u32::from(FDFLAGS_NONBLOCK) => entry.flags = FDFLAGS_NONBLOCK,
            f if f & FDFLAGS_APPEND != 0 => return Err(ROFS),
            _ => return Err(NOTSUP),
        }
        Ok(())
    }

    /// Rights can only shrink.
    pub(super) fn fdstat_set_rights(
        &mut self,
        fd: u32,
        base: u64,
        inheriting: u64,
    ) -> Result<(), Errno> {
        let entry = self.entry_mut(fd)?;
        if base & !entry.rights != 0 || inheriting & !entry.inheriting != 0 {
            return Err(NOTCAPABLE);
        }
        entry.rights = base;
        entry.inheriting = inheriting;
        Ok(())
    }

    pub(super) fn filestat_get(
        &self,
        mem: &Mem<'_>,
        flavor: Flavor,
        fd: u32,
        buf: u32,
    ) -> Result<(), Errno> {
        let entry = self.entry(fd)?;
        if entry.rights & rights::FD_FILESTAT_GET == 0 {
            return Err(NOTCAPABLE);
        }
        let st = fstat(self.host(entry)).map_err(from_host)?;
        write_filestat(mem, flavor, buf, &st)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn path_filestat_get(
        &self,
        mem: &Mem<'_>,
        flavor: Flavor,
        fd: u32,
        lookup: u32,
        path: u32,
        path_len: u32,
        buf: u32,
    ) -> Result<(), Errno> {
        let dir = self.dir_with(fd, rights::PATH_FILESTAT_GET)?;
        let path = guest_path(mem, path, path_len)?;
        let mut flags = OFlag::O_PATH;
        if lookup & LOOKUP_SYMLINK_FOLLOW == 0 {
            // With O_PATH, the link itself: lstat.
            flags |= OFlag::O_NOFOLLOW;
        }
        let found = open_beneath(dir, OsStr::from_bytes(&path), flags)?;
        let st = fstat(&found).map_err(from_host)?;
        write_filestat(mem, flavor, buf, &st)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn readlink(
        &self,
        mem: &Mem<'_>,
        fd: u32,
        path: u32,
        path_len: u32,
        buf: u32,
        buf_len: u32,
        used: u32,
    ) -> Result<(), Errno> {
        let dir = self.dir_with(fd, rights::PATH_READLINK)?;
        let path = guest_path(mem, path, path_len)?;
        mem.check(buf, buf_len)?;
        mem.check(used, 4u64)?;
        let link = open_beneath(
            dir,
            OsStr::from_bytes(&path),
            OFlag::O_PATH | OFlag::O_NOFOLLOW,
        )?;
        // An empty path reads the link an O_PATH fd names.
        let target = readlinkat(&link, "").map_err(from_host)?;
        let bytes = target.as_bytes();
        let n = bytes.len().min(buf_len as usize);
        mem.write(buf, &bytes[..n])?;
        mem.write_u32(used, n as u32)
    }

    /// `fd_readdir`: entries from `cookie` on (0 = the start; else the `d_next` of the last
    /// entry the guest took), as many as fit in `buf_len` bytes, the last one cut if it does
    /// not fit; fewer than `buf_len` bytes means the end was reached.
    pub(super) fn readdir(
        &self,
        mem: &Mem<'_>,
        fd: u32,
        buf: u32,
        buf_len: u32,
        cookie: u64,
        used: u32,
    ) -> Result<(), Errno> {
        let entry = self.entry(fd)?;
        if matches!(entry.kind, Kind::File(_)) {
            return Err(NOTDIR);
        }
        if entry.rights & rights::FD_READDIR == 0 {
            return Err(NOTCAPABLE);
        }
        mem.check(buf, buf_len)?;
        mem.check(used, 4u64)?;
        // The preopen's own fd is O_PATH: list it through a fresh handle on the same directory.
        let listed;
        let dir = match &entry.kind {
            Kind::Preopen(_) => {
                listed = open_beneath(
                    self.host(entry),
                    OsStr::new("."),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                )?;
                listed.as_fd()
            }
            _ => self.host(entry),
        };
        let start = i64::try_from(cookie).map_err(|_| INVAL)?;
        lseek(dir, start, Whence::SeekSet).map_err(from_host)?;
        let mut chunk = vec![0u8; DIRENT_CHUNK];
        let mut filled = 0u32;
        'read: while filled < buf_len {
            let n = getdents(dir, &mut chunk)?;
            if n == 0 {
                break;
            }
            for record in Dirents(&chunk[..n]) {
                let record = record?;
                let mut out = Vec::with_capacity(DIRENT_HEADER + record.name.len());
                out.extend_from_slice(&record.next.to_le_bytes());
                out.extend_from_slice(&record.ino.to_le_bytes());
                out.extend_from_slice(&(record.name.len() as u32).to_le_bytes());
                out.push(record.filetype);
                out.extend_from_slice(&[0; 3]);
                out.extend_from_slice(record.name);
                let room = (buf_len - filled) as usize;
                let take = out.len().min(room);
                mem.write(u64::from(buf) + u64::from(filled), &out[..take])?;
                filled += take as u32;
                if filled == buf_len {
                    break 'read;
                }
            }
        }
        mem.write_u32(used, filled)
    }

    /// Why a path call that would change the directory `fd` fails.
    pub(super) fn mutate(&self, fd: u32) -> Result<(), Errno> {
        match self.entry(fd)?.kind {
            Kind::File(_) => Err(NOTDIR),
            Kind::Dir(_) | Kind::Preopen(_) => Err(ROFS),
        }
    }

    /// `fd_sync`, `fd_datasync`: nothing was written, so nothing is left to sync.
    pub(super) fn sync(&self, fd: u32) -> Result<(), Errno> {
        self.entry(fd).map(drop)
    }

    /// `fd_advise`: a hint, taken and ignored once checked.
    pub(super) fn advise(&self, fd: u32, advice: u32) -> Result<(), Errno> {
        let entry = self.entry(fd)?;
        if advice > 5 {
            return Err(INVAL);
        }
        if entry.rights & rights::FD_ADVISE == 0 {
            return Err(NOTCAPABLE);
        }
        Ok(())
    }

    /// `fd_allocate`, `fd_filestat_set_size`: need a file open for writing, which none is.
    pub(super) fn resize(&self, fd: u32) -> Result<(), Errno> {
        match self.entry(fd)?.kind {
            Kind::File(_) => Err(BADF),
            _ => Err(ISDIR),
        }
    }

    /// For `poll_oneoff`: bytes left to read in a file (regular files are always ready).
    pub(super) fn readable(&self, fd: u32) -> Result<u64, Errno> {
        let file = self.file_with(fd, rights::POLL_FD_READWRITE)?;
        let size = fstat(file).map_err(from_host)?.st_size.max(0) as u64;
        let at = lseek(file, 0, Whence::SeekCur).map_err(from_host)?.max(0) as u64;
        Ok(size.saturating_sub(at))
    }

    /// True if `fd` is one of this table's.
    pub(super) fn contains(&self, fd: u32) -> bool {
        self.entries.contains_key(&fd)
    }
}

fn preopen_entry(i: usize) -> Entry {
    Entry {
        kind: Kind::Preopen(i),
        rights: rights::DIRECTORY,
        inheriting: rights::ALL,
        flags: 0,
    }
}

/// Reads a guest path: at most PATH_MAX bytes, no NUL, not empty.
fn guest_path(mem: &Mem<'_>, ptr: u32, len: u32) -> Result<Vec<u8>, Errno> {
    if len > PATH_MAX {
        return Err(NAMETOOLONG);
    }
    mem.check(ptr, len)?;
    let mut path = vec![0u8; len as usize];
    mem.read(ptr, &mut path)?;
    if path.is_empty() {
        return Err(NOENT);
    }
    if path.contains(&0) {
        return Err(INVAL);
    }
    Ok(path)
}

/// Opens `path` beneath `dir`, never outside it: the kernel resolves every component,
/// symlinks included, and refuses (`EXDEV`, here `NOTCAPABLE`) any step that would leave
/// the directory — `..` above it, an absolute path or symlink, a relative symlink leading
/// out — and every magic link (`/proc/self/fd/N` and the like). `flags` is how to open the
/// result; close-on-exec is always added.
pub(crate) fn open_beneath(
    dir: BorrowedFd<'_>,
    path: impl AsRef<OsStr>,
    flags: OFlag,
) -> Result<OwnedFd, Errno> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let path = path.as_ref();
    loop {
        match openat2(dir, path, how) {
            Ok(fd) => return Ok(fd),
            // The kernel may ask again when a rename raced the lookup.
            Err(HostErrno::EAGAIN | HostErrno::EINTR) => continue,
            Err(HostErrno::EXDEV) => return Err(NOTCAPABLE),
            Err(e) => return Err(from_host(e)),
        }
    }
}

// The stat fields' types differ between architectures (`st_nlink` is a u32 on aarch64), so
// conversions that do nothing on x86_64 stay.
#[allow(clippy::useless_conversion)]
fn write_filestat(mem: &Mem<'_>, flavor: Flavor, buf: u32, st: &FileStat) -> Result<(), Errno> {
    let nanos = |s: i64, ns: i64| (s.max(0) as u64).saturating_mul(1_000_000_000) + ns as u64;
    let filetype = filetype(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT);
    let mut out = [0u8; 64];
    out[0..8].copy_from_slice(&u64::from(st.st_dev).to_le_bytes());
    out[8..16].copy_from_slice(&u64::from(st.st_ino).to_le_bytes());
    out[16] = filetype;
    let times = [
        nanos(st.st_atime, st.st_atime_nsec),
        nanos(st.st_mtime, st.st_mtime_nsec),
        nanos(st.st_ctime, st.st_ctime_nsec),
    ];
    let size = st.st_size.max(0) as u64;
    match flavor {
        // nlink u64 @24, size @32, atim @40, mtim @48, ctim @56.
        Flavor::Preview1 => {
            out[24..32].copy_from_slice(&u64::from(st.st_nlink).to_le_bytes());
            out[32..40].copy_from_slice(&size.to_le_bytes());
            for (i, t) in times.iter().enumerate() {
                out[40 + 8 * i..48 + 8 * i].copy_from_slice(&t.to_le_bytes());
            }
        }
        // nlink u32 @20, size @24, atim @32, mtim @40, ctim @48.
        Flavor::Unstable => {
            let nlink = u32::try_from(st.st_nlink).unwrap_or(u32::MAX);
            out[20..24].copy_from_slice(&nlink.to_le_bytes());
            out[24..32].copy_from_slice(&size.to_le_bytes());
            for (i, t) in times.iter().enumerate() {
                out[32 + 8 * i..40 + 8 * i].copy_from_slice(&t.to_le_bytes());
            }
        }
    }
    mem.write(buf, &out[..flavor.filestat_size()])
}

fn filetype(kind: SFlag) -> u8 {
    match kind {
        SFlag::S_IFDIR => FILETYPE_DIRECTORY,
        SFlag::S_IFREG => FILETYPE_REGULAR_FILE,
        SFlag::S_IFLNK => FILETYPE_SYMBOLIC_LINK,
        SFlag::S_IFCHR => FILETYPE_CHARACTER_DEVICE,
        SFlag::S_IFBLK => FILETYPE_BLOCK_DEVICE,
        SFlag::S_IFSOCK => FILETYPE_SOCKET_STREAM,
        _ => FILETYPE_UNKNOWN,
    }
}

/// getdents64(2) into `buf`: bytes of `linux_dirent64` records, 0 at the end.
fn getdents(dir: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    loop {
        // SAFETY: getdents64 writes at most `buf.len()` bytes into `buf`, a valid, writable
        // slice, and reads nothing of ours; `dir` is an open fd for the call's duration.
        // Raw syscall: neither nix nor std has getdents64 with the entries' offsets.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dir.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        match HostErrno::last() {
            HostErrno::EINTR => continue,
            e => return Err(from_host(e)),
        }
    }
}

/// One `linux_dirent64` record.
struct Dirent<'a> {
    ino: u64,
    /// The offset of the next record: the cookie that resumes after this one.
    next: u64,
    filetype: u8,
    name: &'a [u8],
}

/// The records in a getdents64 buffer, each checked to lie inside it.
struct Dirents<'a>(&'a [u8]);

impl<'a> Iterator for Dirents<'a> {
    type Item = Result<Dirent<'a>, Errno>;

    fn next(&mut self) -> Option<Self::Item> {
        // d_ino u64 @0, d_off i64 @8, d_reclen u16 @16, d_type u8 @18, d_name @19 (NUL-ended).
        const NAME: usize = 19;
        let b = self.0;
        if b.is_empty() {
            return None;
        }
        if b.len() < NAME {
            self.0 = &[];
            return Some(Err(IO));
        }
        let reclen = usize::from(u16::from_le_bytes([b[16], b[17]]));
        if reclen < NAME || reclen > b.len() {
            self.0 = &[];
            return Some(Err(IO));
        }
        let name = &b[NAME..reclen];
        let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
        let dirent = Dirent {
            ino: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            next: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            filetype: match b[18] {
                libc::DT_DIR => FILETYPE_DIRECTORY,
                libc::DT_REG => FILETYPE_REGULAR_FILE,
                libc::DT_LNK => FILETYPE_SYMBOLIC_LINK,
                libc::DT_CHR => FILETYPE_CHARACTER_DEVICE,
                libc::DT_BLK => FILETYPE_BLOCK_DEVICE,
                libc::DT_SOCK => FILETYPE_SOCKET_STREAM,
                _ => FILETYPE_UNKNOWN,
            },
            name,
        };
        self.0 = &b[reclen..];
        Some(Ok(dirent))
    }
}

/// The WASI errno for a host one.
pub(super) fn from_host(e: HostErrno) -> Errno {
    match e {
        HostErrno::EACCES => ACCES,
        HostErrno::EAGAIN => AGAIN,
        HostErrno::EBADF => BADF,
        HostErrno::EEXIST => EXIST,
        HostErrno::EFAULT => FAULT,
        HostErrno::EFBIG => FBIG,
        HostErrno::EINTR => INTR,
        HostErrno::EINVAL => INVAL,
        HostErrno::EIO => IO,
        HostErrno::EISDIR => ISDIR,
        HostErrno::ELOOP => LOOP,
        HostErrno::EMFILE => MFILE,
        HostErrno::ENAMETOOLONG => NAMETOOLONG,
        HostErrno::ENFILE => NFILE,
        HostErrno::ENODEV => NODEV,
        HostErrno::ENOENT => NOENT,
        HostErrno::ENOMEM => NOMEM,
        HostErrno::ENOSPC => NOSPC,
        HostErrno::ENOSYS => NOSYS,
        HostErrno::ENOTDIR => NOTDIR,
        HostErrno::ENOTEMPTY => NOTEMPTY,
        HostErrno::ENXIO => NXIO,
        HostErrno::EOVERFLOW => OVERFLOW,
        HostErrno::EPERM => PERM,
        HostErrno::EROFS => ROFS,
        HostErrno::ESPIPE => SPIPE,
        HostErrno::ETXTBSY => TXTBSY,
        HostErrno::EXDEV => NOTCAPABLE,
        _ => IO,
    }
}
