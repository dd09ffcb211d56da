//! Image metadata: everything a child needs besides the memory pages to continue a parent
//! instance — which module and engine, how big the memory is, which pages hold data, the value
//! of every global (exported or not), the size of every (funcref) table, and which WASI
//! layout the parent ran with. The layout travels as a digest, not as its contents: the
//! environment may hold secrets, and the child rebuilds the layout from its own config and
//! only has to prove it is the same.
//!
//! It crosses two boundaries: a worker hands it to its node service with the image memfd
//! after `fork_prepare`, and a page server hands it to a remote child ([`crate::pages`]'s
//! `Meta` frame). Both peers are Spindle processes, but the second sits across a network, so
//! decoding is as strict as for the descriptor: every length is bounded before anything is
//! allocated and every byte is accounted for.
//!
//! On the wire (little-endian): magic `b"SPDLMETA"`, version u16, module hash 32, engine
//! (u8 length + ASCII), memory bytes u64, non-zero page bitmap (u32 word count + u64 words:
//! exactly `ceil(pages / 64)` words, no bit set past the last page), globals (u32 count, then
//! per global: type u8, mutability u8, value u128), tables (u32 count, then u32 sizes), WASI
//! layout digest 32, closed-stdio bits u8 (bit i: fd i closed).

use thiserror::Error;

use crate::image::{Cursor, MAX_ENGINE, MAX_MEMORY, PAGE_SIZE, WASM_PAGE};

pub const META_MAGIC: [u8; 8] = *b"SPDLMETA";
/// Globals one image may carry: far above what compilers emit (a handful), far below what
/// would let a peer make us allocate much.
pub const MAX_GLOBALS: usize = 4096;
/// Tables one image may carry (Wasm has had one; reference types allow a few).
pub const MAX_TABLES: usize = 64;

/// A Wasm value type, as far as a global can hold one that an image can carry. Reference
/// types are not capturable (their values are host pointers), so they have no tag.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalType {
    I32 = 1,
    I64 = 2,
    F32 = 3,
    F64 = 4,
    V128 = 5,
    /// An immutable funcref global: instantiation recreates its value, so none is carried
    /// (its bits are zero on the wire). A mutable one cannot be captured.
    FuncRef = 6,
}

impl TryFrom<u8> for GlobalType {
    type Error = MetaError;

    fn try_from(v: u8) -> Result<Self, MetaError> {
        Ok(match v {
            1 => GlobalType::I32,
            2 => GlobalType::I64,
            3 => GlobalType::F32,
            4 => GlobalType::F64,
            5 => GlobalType::V128,
            6 => GlobalType::FuncRef,
            other => return Err(MetaError::BadGlobalType(other)),
        })
    }
}

impl GlobalType {
    /// Bits a value of this type uses; the rest of the u128 must be zero.
    fn bits(self) -> u32 {
        match self {
            GlobalType::I32 | GlobalType::F32 => 32,
            GlobalType::I64 | GlobalType::F64 => 64,
            GlobalType::V128 => 128,
            GlobalType::FuncRef => 0,
        }
    }
}

/// One global's value, as raw bits (floats by their bit pattern, so NaN payloads survive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlobalValue {
    pub ty: GlobalType,
    pub mutable: bool,
    pub bits: u128,
}

/// One bit per 4 KiB page: which pages of an image hold data (the rest read as zero and are
/// never sent), or which pages of a region are already in place. The one page map of the
/// workspace: the wire form ([`words`](Self::words)) is what images carry.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PageBitmap {
    pages: u64,
    words: Vec<u64>,
}

impl PageBitmap {
    /// All pages clear.
    pub fn new(pages: u64) -> Self {
        PageBitmap {
            pages,
            words: vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// The pages of `image` that hold a non-zero byte (a partial last page counts as one).
    pub fn nonzero_pages(image: &[u8]) -> Self {
        let page = PAGE_SIZE as usize;
        let mut map = PageBitmap::new(image.len().div_ceil(page) as u64);
        for (i, chunk) in image.chunks(page).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                map.set(i as u64);
            }
        }
        map
    }

    /// Rebuilds a bitmap from its words; `None` when the word count does not fit `pages` or
    /// a bit past the last page is set.
    pub fn from_words(pages: u64, words: Vec<u64>) -> Option<Self> {
        if words.len() as u64 != pages.div_ceil(64) {
            return None;
        }
        let tail = pages % 64;
        if tail != 0 && words.last().is_some_and(|w| w >> tail != 0) {
            return None;
        }
        Some(PageBitmap { pages, words })
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Sets the bit of `page`; a page past the end does not exist and is ignored.
    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// The bit of `page` (false past the end: such a page does not exist).
    pub fn is_set(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// True for a page that exists and whose bit is clear: in an image's page map, a page
    /// known to be all zero.
    pub fn is_clear(&self, page: u64) -> bool {
        page < self.pages && !self.is_set(page)
    }

    /// Pages whose bit is set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The pages whose bit is set, ascending.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.pages).filter(|&p| self.is_set(p))
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageMeta {
    /// SHA-256 of the module bytes ([`crate::image::module_hash`]).
    pub module_hash: [u8; 32],
    /// Engine/ABI identity; a child whose engine differs must not use the image.
    pub engine: String,
    /// Linear memory size, a multiple of the Wasm page.
    pub memory_bytes: u64,
    /// Which 4 KiB pages of the memory hold data.
    pub nonzero: PageBitmap,
    /// Every global of the instance, in the instance's creation order.
    pub globals: Vec<GlobalValue>,
    /// The size of every table, in index order (tables are funcref; their contents are
    /// what instantiation produces).
    pub tables: Vec<u32>,
    /// SHA-256 of the WASI layout (args and environment) the parent ran with.
    pub wasi_digest: [u8; 32],
    /// Bit i set: the guest closed stdio fd i (0, 1, 2).
    pub stdio_closed: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MetaError {
    #[error("not image metadata (bad magic)")]
    BadMagic,
    #[error("image metadata version {0} is not supported (this build reads version 1)")]
    UnsupportedVersion(u16),
    #[error("image metadata truncated in {0}")]
    Truncated(&'static str),
    #[error("image metadata has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("engine identity is empty, longer than {MAX_ENGINE} bytes, or not printable ASCII")]
    BadEngine,
    #[error("memory size {0} is not a multiple of 64 KiB up to 4 GiB")]
    BadMemorySize(u64),
    #[error("page bitmap has {got} words, {expected} expected for the memory size")]
    BitmapLength { expected: u64, got: u64 },
    #[error("page bitmap marks pages past the end of memory")]
    BitmapPadding,
    #[error("{what}: {count} is more than the {max} an image may carry")]
    TooMany {
        what: &'static str,
        count: u64,
        max: usize,
    },
    #[error("unknown global type {0}")]
    BadGlobalType(u8),
    #[error("global mutability flag {0} is neither 0 nor 1")]
    BadMutability(u8),
    #[error("global {index} of type {ty:?} has bits set beyond its width")]
    GlobalValueWidth { index: usize, ty: GlobalType },
    #[error("global {0} is a mutable funcref, which no image can carry")]
    MutableFuncRef(usize),
    #[error("closed-stdio bits {0:#x} name fds other than 0, 1 and 2")]
    BadStdio(u8),
}

impl ImageMeta {
    pub const VERSION: u16 = 1;

    /// Pages of [`PAGE_SIZE`] in the memory.
    pub fn pages(&self) -> u64 {
        self.memory_bytes / u64::from(PAGE_SIZE)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            64 + self.engine.len() + self.nonzero.words.len() * 8 + self.globals.len() * 18,
        );
        out.extend_from_slice(&META_MAGIC);
        out.extend_from_slice(&Self::VERSION.to_le_bytes());
        out.extend_from_slice(&self.module_hash);
        let engine = &self.engine.as_bytes()[..self.engine.len().min(u8::MAX as usize)];
        out.push(engine.len() as u8);
        out.extend_from_slice(engine);
        out.extend_from_slice(&self.memory_bytes.to_le_bytes());
        out.extend_from_slice(&(self.nonzero.words.len() as u32).to_le_bytes());
        for w in &self.nonzero.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&(self.globals.len() as u32).to_le_bytes());
        for g in &self.globals {
            out.push(g.ty as u8);
            out.push(u8::from(g.mutable));
            out.extend_from_slice(&g.bits.to_le_bytes());
        }
        out.extend_from_slice(&(self.tables.len() as u32).to_le_bytes());
        for t in &self.tables {
            out.extend_from_slice(&t.to_le_bytes());
        }
        out.extend_from_slice(&self.wasi_digest);
        out.push(self.stdio_closed);
        out
    }

    pub fn decode(buf: &[u8]) -> Result<ImageMeta, MetaError> {
        let mut c = Cursor::new(buf);
        let t = MetaError::Truncated;
        if c.array::<8>().ok_or(t("magic"))? != META_MAGIC {
            return Err(MetaError::BadMagic);
        }
        let version = c.u16().ok_or(t("version"))?;
        if version != Self::VERSION {
            return Err(MetaError::UnsupportedVersion(version));
        }
        let module_hash = c.array::<32>().ok_or(t("module hash"))?;
        let engine_len = c.u8().ok_or(t("engine length"))?;
        let engine = c.take(engine_len.into()).ok_or(t("engine"))?;
        if engine.is_empty()
            || engine.len() > MAX_ENGINE
            || !engine.iter().all(|b| (0x20..0x7f).contains(b))
        {
            return Err(MetaError::BadEngine);
        }
        let engine = String::from_utf8(engine.to_vec()).map_err(|_| MetaError::BadEngine)?;
        let memory_bytes = c.u64().ok_or(t("memory size"))?;
        if memory_bytes % WASM_PAGE != 0 || memory_bytes > MAX_MEMORY {
            return Err(MetaError::BadMemorySize(memory_bytes));
        }
        let pages = memory_bytes / u64::from(PAGE_SIZE);
        let words = u64::from(c.u32().ok_or(t("bitmap length"))?);
        if words != pages.div_ceil(64) {
            return Err(MetaError::BitmapLength {
                expected: pages.div_ceil(64),
                got: words,
            });
        }
        let mut words = vec![0u64; words as usize];
        for w in words.iter_mut() {
            *w = c.u64().ok_or(t("bitmap"))?;
        }
        let nonzero = PageBitmap::from_words(pages, words).ok_or(MetaError::BitmapPadding)?;
        let count = bounded(c.u32().ok_or(t("global count"))?, "globals", MAX_GLOBALS)?;
        let mut globals = Vec::with_capacity(count);
        for index in 0..count {
            let ty = GlobalType::try_from(c.u8().ok_or(t("global type"))?)?;
            let mutable = match c.u8().ok_or(t("global mutability"))? {
                0 => false,
                1 => true,
                other => return Err(MetaError::BadMutability(other)),
            };
            let bits = u128::from_le_bytes(c.array::<16>().ok_or(t("global value"))?);
            if ty == GlobalType::FuncRef && mutable {
                return Err(MetaError::MutableFuncRef(index));
            }
            if ty.bits() < 128 && bits >> ty.bits() != 0 {
                return Err(MetaError::GlobalValueWidth { index, ty });
            }
            globals.push(GlobalValue { ty, mutable, bits });
        }
        let count = bounded(c.u32().ok_or(t("table count"))?, "tables", MAX_TABLES)?;
        let mut tables = Vec::with_capacity(count);
        for _ in 0..count {
            tables.push(c.u32().ok_or(t("table size"))?);
        }
        let wasi_digest = c.array::<32>().ok_or(t("WASI digest"))?;
        let stdio_closed = c.u8().ok_or(t("closed stdio"))?;
        if stdio_closed & !0b111 != 0 {
            return Err(MetaError::BadStdio(stdio_closed));
        }
        if c.remaining() != 0 {
            return Err(MetaError::TrailingBytes(c.remaining()));
        }
        Ok(ImageMeta {
            module_hash,
            engine,
            memory_bytes,
            nonzero,
            globals,
            tables,
            wasi_digest,
            stdio_closed,
        })
    }
}

fn bounded(count: u32, what: &'static str, max: usize) -> Result<usize, MetaError> {
    let n = count as usize;
    if n > max {
        return Err(MetaError::TooMany {
            what,
            count: count.into(),
            max,
        });
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ImageMeta {
        let memory_bytes = 3 * WASM_PAGE; // 48 pages: the bitmap's last word is partial
        let mut nonzero = PageBitmap::new(memory_bytes / 4096);
        for p in [0, 1, 17, 47] {
            nonzero.set(p);
        }
        ImageMeta {
            module_hash: [7; 32],
            engine: "wasmer-7.4/cranelift/x86_64/spindle-abi-1".into(),
            memory_bytes,
            nonzero,
            globals: vec![
                GlobalValue {
                    ty: GlobalType::I32,
                    mutable: true,
                    bits: 0x0001_0000,
                },
                GlobalValue {
                    ty: GlobalType::F64,
                    mutable: false,
                    bits: f64::NAN.to_bits().into(),
                },
                GlobalValue {
                    ty: GlobalType::V128,
                    mutable: true,
                    bits: u128::MAX,
                },
                GlobalValue {
                    ty: GlobalType::FuncRef,
                    mutable: false,
                    bits: 0,
                },
            ],
            tables: vec![3, 0],
            wasi_digest: [9; 32],
            stdio_closed: 0b010,
        }
    }

    #[test]
    fn bitmap_scans_round_trips_and_refuses_padding() {
        let mut image = vec![0u8; 5 * 4096 + 10];
        image[4096] = 1;
        image[5 * 4096 + 3] = 7;
        let map = PageBitmap::nonzero_pages(&image);
        assert_eq!(map.pages(), 6);
        assert_eq!(map.iter_set().collect::<Vec<_>>(), [1, 5]);
        assert_eq!(
            PageBitmap::from_words(6, map.words().to_vec()),
            Some(map.clone())
        );
        assert_eq!(
            PageBitmap::from_words(6, vec![1 << 6]),
            None,
            "bit past the end"
        );
        assert_eq!(PageBitmap::from_words(65, vec![0]), None, "too few words");
        let mut m = map;
        m.set(1000);
        assert!(
            !m.is_set(1000) && m.count() == 2,
            "pages past the end do not exist"
        );
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let m = sample();
        assert_eq!(ImageMeta::decode(&m.encode()), Ok(m.clone()));
        assert_eq!(m.nonzero.count(), 4);
        assert!(m.nonzero.is_set(47) && !m.nonzero.is_set(46) && !m.nonzero.is_set(48));
        assert_eq!(m.pages(), 48);
    }

    #[test]
    fn every_strict_prefix_is_truncated() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(
                matches!(
                    ImageMeta::decode(&bytes[..len]),
                    Err(MetaError::Truncated(_))
                ),
                "prefix of {len} bytes"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(ImageMeta::decode(&long), Err(MetaError::TrailingBytes(1)));
    }

    #[test]
    fn malformed_fields_are_refused_with_their_reason() {
        let good = sample();
        let mut m = good.clone();
        m.memory_bytes += 4096;
        assert_eq!(
            ImageMeta::decode(&m.encode()),
            Err(MetaError::BadMemorySize(good.memory_bytes + 4096))
        );
        let mut m = good.clone();
        m.nonzero = PageBitmap::new(good.pages() + 64);
        assert!(matches!(
            ImageMeta::decode(&m.encode()),
            Err(MetaError::BitmapLength { .. })
        ));
        let mut m = good.clone();
        m.nonzero.words[0] = 0;
        if let Some(w) = m.nonzero.words.last_mut() {
            *w |= 1 << 63;
        }
        assert_eq!(
            ImageMeta::decode(&m.encode()),
            Err(MetaError::BitmapPadding)
        );
        let mut m = good.clone();
        m.globals[0].bits = 1 << 40;
        assert_eq!(
            ImageMeta::decode(&m.encode()),
            Err(MetaError::GlobalValueWidth {
                index: 0,
                ty: GlobalType::I32
            })
        );
        let mut m = good.clone();
        m.engine = String::new();
        assert_eq!(ImageMeta::decode(&m.encode()), Err(MetaError::BadEngine));
        let mut m = good.clone();
        m.globals[3].mutable = true;
        assert_eq!(
            ImageMeta::decode(&m.encode()),
            Err(MetaError::MutableFuncRef(3))
        );
        let mut m = good.clone();
        m.globals[3].bits = 1;
        assert!(matches!(
            ImageMeta::decode(&m.encode()),
            Err(MetaError::GlobalValueWidth { index: 3, .. })
        ));
        let mut m = good.clone();
        m.stdio_closed = 0b1000;
        assert_eq!(ImageMeta::decode(&m.encode()), Err(MetaError::BadStdio(8)));

        let bytes = good.encode();
        let engine_at = 8 + 2 + 32 + 1;
        let mut bad = bytes.clone();
        bad[engine_at] = 0x07;
        assert_eq!(ImageMeta::decode(&bad), Err(MetaError::BadEngine));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(ImageMeta::decode(&bad), Err(MetaError::BadMagic));
        let mut bad = bytes.clone();
        bad[8] = 2;
        assert_eq!(
            ImageMeta::decode(&bad),
            Err(MetaError::UnsupportedVersion(2))
        );
        let globals_at = engine_at + good.engine.len() + 8 + 4 + 8 * good.nonzero.words.len();
        let mut bad = bytes.clone();
        bad[globals_at..globals_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            ImageMeta::decode(&bad),
            Err(MetaError::TooMany {
                what: "globals",
                ..
            })
        ));
        let mut bad = bytes.clone();
        bad[globals_at + 4] = 9;
        assert_eq!(ImageMeta::decode(&bad), Err(MetaError::BadGlobalType(9)));
        let mut bad = bytes;
        bad[globals_at + 5] = 2;
        assert_eq!(ImageMeta::decode(&bad), Err(MetaError::BadMutability(2)));
    }

    #[test]
    fn random_mutations_never_panic() {
        let bytes = sample().encode();
        let mut rng = crate::test_rng::XorShift(0x9e37_79b9_7f4a_7c15);
        let mut next = || rng.next();
        for _ in 0..20_000 {
            let mut b = bytes.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            b.truncate((next() as usize) % (b.len() + 1));
            let _ = ImageMeta::decode(&b);
        }
    }
}
