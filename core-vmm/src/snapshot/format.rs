//! The snapshot file format: ours, versioned and self-describing. A prelude (magic, format
//! version, the header's length and checksum) and the header (Bulkhead version, host CPU,
//! CPU template, RAM size), then checksummed sections — the VM config, one per component
//! state record, the guest-RAM index — then guest RAM, sparse (only pages that are not
//! zero), page-aligned, each run with its own checksum, and an end section. Integers are
//! little-endian; section payloads are postcard.
//!
//! ```text
//! "BHSNAP\r\n" | version u32 | header_len u32 | header_crc u32 | header
//! section*: tag [4] | len u64 | crc u32 | payload      CONF, STAT..., RAMI
//! zero padding to a page | RAM runs, back to back | section END
//! ```
//!
//! A reader checks everything it can before anything is started: magic, version, each
//! checksum, the file's length against what the index says, and the end section (a save
//! that died half-way has none).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::crc::{crc32, Crc32};

/// The first bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"BHSNAP\r\n";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Guest page size: RAM is written and skipped in pages.
pub const PAGE: u64 = 4096;
const PRELUDE_LEN: u64 = 20;
const SECTION_HEAD: u64 = 16;
/// No section payload is larger than this (RAM is not a section payload).
const MAX_SECTION: u64 = 64 << 20;
/// Nor a header.
const MAX_HEADER: u32 = 1 << 20;

const TAG_CONF: [u8; 4] = *b"CONF";
const TAG_STAT: [u8; 4] = *b"STAT";
const TAG_RAMI: [u8; 4] = *b"RAMI";
const TAG_END: [u8; 4] = *b"END\0";

/// What a snapshot says about where and how it was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The Bulkhead version that wrote it.
    pub bulkhead_version: String,
    /// Host CPU vendor (`GenuineIntel`, `AuthenticAMD`).
    pub cpu_vendor: String,
    /// Host CPU family, model and stepping, e.g. `family 6 model 85`.
    pub cpu_model: String,
    /// The CPU template the vCPUs were given (resolved: `host`, `minimal`).
    pub cpu_template: String,
    /// When it was taken (seconds since the epoch).
    pub created_unix: u64,
    /// Guest RAM size in bytes.
    pub memory: u64,
}

/// One component's state (a vCPU, the VM's irqchip and clocks, a device...), opaque here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Which component (`vcpu0`, `vm`, `disk0`...).
    pub name: String,
    /// Its state, postcard.
    pub data: Vec<u8>,
}

/// A run of RAM pages that are written: where in RAM (memfd offset) and how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRun {
    /// Offset in guest RAM (the memfd), page-aligned.
    pub offset: u64,
    /// Length, a multiple of the page size.
    pub len: u64,
    /// CRC-32 of the run's bytes.
    pub crc: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RamIndex {
    /// Guest RAM size.
    size: u64,
    /// Where the first run starts in the file.
    data_offset: u64,
    /// The runs, in RAM order, back to back in the file.
    runs: Vec<RamRun>,
}

/// Why a snapshot cannot be read or written. Each says what is wrong in one line.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// Reading or writing the file failed.
    #[error("snapshot file: {0}")]
    Io(#[from] std::io::Error),
    /// Not a snapshot at all.
    #[error("not a Bulkhead snapshot (bad magic)")]
    BadMagic,
    /// Written by a format this code does not read.
    #[error("snapshot format version {found}; this Bulkhead reads version {FORMAT_VERSION}")]
    WrongVersion {
        /// The file's version.
        found: u32,
    },
    /// The file ends before what it announces.
    #[error("snapshot is truncated: {what} ends past the end of the file ({len} bytes)")]
    Truncated {
        /// What was cut off.
        what: String,
        /// The file's length.
        len: u64,
    },
    /// A checksum does not match.
    #[error("snapshot is corrupted: checksum mismatch in {what}")]
    Checksum {
        /// Which part.
        what: String,
    },
    /// The structure is not what this version writes.
    #[error("snapshot is malformed: {0}")]
    Malformed(String),
    /// Taken on another kind of host.
    #[error("snapshot was taken on {taken}; this host is {here}")]
    WrongHost {
        /// The snapshot's host CPU.
        taken: String,
        /// This host's.
        here: String,
    },
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, SnapshotError> {
    postcard::to_allocvec(v).map_err(|e| SnapshotError::Malformed(format!("encoding: {e}")))
}

fn decode<'a, T: Deserialize<'a>>(what: &str, b: &'a [u8]) -> Result<T, SnapshotError> {
    postcard::from_bytes(b).map_err(|e| SnapshotError::Malformed(format!("{what}: {e}")))
}

/// Sizes of a written snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    /// Bytes of guest RAM written (pages that are not zero).
    pub ram_written: u64,
    /// The file's length.
    pub file_len: u64,
}

/// The runs of pages of `ram` that are not zero. With `holes` (the memfd behind `ram`),
/// holes it reports (pages never touched) are skipped without being read.
pub fn ram_runs(ram: &[u8], holes: Option<&File>) -> Vec<RamRun> {
    let size = ram.len() as u64;
    let extents = holes
        .and_then(|f| data_extents(f, size).ok())
        .unwrap_or_else(|| vec![(0, size)]);
    let mut runs: Vec<RamRun> = Vec::new();
    let mut current: Option<(u64, Crc32)> = None;
    let mut end = 0u64;
    for (start, stop) in extents {
        // Extents never overlap, but two may share a page: each page is looked at once.
        let mut page = (start & !(PAGE - 1)).max(end);
        while page < stop.min(size) {
            let len = PAGE.min(size - page);
            let bytes = &ram[page as usize..(page + len) as usize];
            let zero = bytes.iter().all(|&b| b == 0);
            if zero || (current.is_some() && page != end) {
                if let Some((off, crc)) = current.take() {
                    runs.push(RamRun {
                        offset: off,
                        len: end - off,
                        crc: crc.finish(),
                    });
                }
            }
            if !zero {
                let (_, crc) = current.get_or_insert((page, Crc32::new()));
                crc.update(bytes);
                end = page + len;
            }
            page += len;
        }
    }
    if let Some((off, crc)) = current.take() {
        runs.push(RamRun {
            offset: off,
            len: end - off,
            crc: crc.finish(),
        });
    }
    runs
}

/// The data extents of `file` (SEEK_DATA/SEEK_HOLE), up to `size`.
fn data_extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let size_i = i64::try_from(size).map_err(std::io::Error::other)?;
    while pos < size_i {
        let data = match lseek(fd, pos, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(fd, data, Whence::SeekHole).map_err(std::io::Error::from)?;
        out.push((data as u64, (hole as u64).min(size)));
        pos = hole;
    }
    Ok(out)
}

fn write_section(out: &mut impl Write, tag: [u8; 4], payload: &[u8]) -> std::io::Result<u64> {
    out.write_all(&tag)?;
    out.write_all(&(payload.len() as u64).to_le_bytes())?;
    out.write_all(&crc32(payload).to_le_bytes())?;
    out.write_all(payload)?;
    Ok(SECTION_HEAD + payload.len() as u64)
}

/// Writes a whole snapshot to `out` (from its start): the header, the VM config, the
/// records and the pages of `ram` that are not zero (`holes`: the memfd behind `ram`, to
/// skip never-touched pages without reading them). RAM is written straight from `ram`.
pub fn write_snapshot(
    out: &File,
    header: &Header,
    config: &[u8],
    records: &[Record],
    ram: &[u8],
    holes: Option<&File>,
) -> Result<WriteStats, SnapshotError> {
    let runs = ram_runs(ram, holes);
    let header_bytes = encode(header)?;
    let mut head = Vec::new();
    head.extend_from_slice(&MAGIC);
    head.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    head.extend_from_slice(&(header_bytes.len() as u32).to_le_bytes());
    head.extend_from_slice(&crc32(&header_bytes).to_le_bytes());
    head.extend_from_slice(&header_bytes);
    write_section(&mut head, TAG_CONF, config)?;
    for r in records {
        write_section(&mut head, TAG_STAT, &encode(r)?)?;
    }
    // The index says where RAM starts: after itself, padded to a page. Its own length
    // depends on that offset's encoding, so size it with a placeholder first.
    let mut index = RamIndex {
        size: ram.len() as u64,
        data_offset: u64::MAX,
        runs,
    };
    let index_len = SECTION_HEAD + encode(&index)?.len() as u64;
    let after = head.len() as u64 + index_len;
    index.data_offset = after.div_ceil(PAGE) * PAGE;
    let index_bytes = encode(&index)?;
    // A smaller offset never encodes longer than u64::MAX did.
    write_section(&mut head, TAG_RAMI, &index_bytes)?;
    head.resize(index.data_offset as usize, 0);
    let mut w = out;
    w.write_all(&head)?;
    let mut ram_written = 0u64;
    for run in &index.runs {
        w.write_all(&ram[run.offset as usize..(run.offset + run.len) as usize])?;
        ram_written += run.len;
    }
    let mut tail = Vec::new();
    write_section(&mut tail, TAG_END, &[])?;
    w.write_all(&tail)?;
    let file_len = index.data_offset + ram_written + tail.len() as u64;
    out.set_len(file_len)?;
    Ok(WriteStats {
        ram_written,
        file_len,
    })
}

/// A snapshot whose header and sections were read and checked; RAM is read on demand
/// ([`Self::fill_ram`]).
#[derive(Debug, Clone)]
pub struct SnapshotReader {
    /// The header.
    pub header: Header,
    /// The VM config, as the writer gave it.
    pub config: Vec<u8>,
    /// The component records, in order.
    pub records: Vec<Record>,
    index: RamIndex,
}

struct Cursor<'a> {
    file: &'a File,
    len: u64,
    pos: u64,
}

impl Cursor<'_> {
    fn read(&mut self, n: u64, what: &str) -> Result<Vec<u8>, SnapshotError> {
        if self.pos.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(SnapshotError::Truncated {
                what: what.to_string(),
                len: self.len,
            });
        }
        let mut buf = vec![0u8; n as usize];
        self.file.read_exact_at(&mut buf, self.pos)?;
        self.pos += n;
        Ok(buf)
    }

    fn section(&mut self, what: &str) -> Result<([u8; 4], Vec<u8>), SnapshotError> {
        let head = self.read(SECTION_HEAD, what)?;
        let mut tag = [0u8; 4];
        tag.copy_from_slice(&head[0..4]);
        let len = u64::from_le_bytes(head[4..12].try_into().unwrap_or([0xff; 8]));
        let crc = u32::from_le_bytes(head[12..16].try_into().unwrap_or([0; 4]));
        if len > MAX_SECTION {
            return Err(SnapshotError::Malformed(format!(
                "{what} claims {len} bytes"
            )));
        }
        let name = format!(
            "{what} ({})",
            String::from_utf8_lossy(&tag).trim_end_matches('\0')
        );
        let payload = self.read(len, &name)?;
        if crc32(&payload) != crc {
            return Err(SnapshotError::Checksum { what: name });
        }
        Ok((tag, payload))
    }
}

impl SnapshotReader {
    /// Reads and checks `file`'s header and sections, and that the file holds all the RAM
    /// its index announces and ends with the end section. RAM checksums are checked as it
    /// is read ([`Self::fill_ram`]).
    pub fn open(file: &File) -> Result<Self, SnapshotError> {
        let len = file.metadata()?.len();
        let mut c = Cursor { file, len, pos: 0 };
        if len < MAGIC.len() as u64 {
            return Err(if len == 0 {
                SnapshotError::Truncated {
                    what: "the prelude".into(),
                    len,
                }
            } else {
                SnapshotError::BadMagic
            });
        }
        let magic = c.read(MAGIC.len() as u64, "the magic")?;
        if magic != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let pre = c.read(PRELUDE_LEN - MAGIC.len() as u64, "the prelude")?;
        let word = |i: usize| u32::from_le_bytes([pre[i], pre[i + 1], pre[i + 2], pre[i + 3]]);
        let version = word(0);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::WrongVersion { found: version });
        }
        if word(4) > MAX_HEADER {
            return Err(SnapshotError::Malformed(format!(
                "the header claims {} bytes",
                word(4)
            )));
        }
        let header_bytes = c.read(u64::from(word(4)), "the header")?;
        if crc32(&header_bytes) != word(8) {
            return Err(SnapshotError::Checksum {
                what: "the header".into(),
            });
        }
        let header: Header = decode("the header", &header_bytes)?;
        let (tag, config) = c.section("section 1")?;
        if tag != TAG_CONF {
            return Err(SnapshotError::Malformed(
                "the first section is not the VM config".into(),
            ));
        }
        let mut records = Vec::new();
        let index = loop {
            let n = records.len() + 2;
            let (tag, payload) = c.section(&format!("section {n}"))?;
            match tag {
                TAG_STAT => records.push(decode::<Record>("a state record", &payload)?),
                TAG_RAMI => break decode::<RamIndex>("the RAM index", &payload)?,
                other => {
                    return Err(SnapshotError::Malformed(format!(
                        "unknown section {:?}",
                        String::from_utf8_lossy(&other)
                    )))
                }
            }
        };
        if index.size != header.memory {
            return Err(SnapshotError::Malformed(format!(
                "RAM index covers {} bytes, header says {}",
                index.size, header.memory
            )));
        }
        let mut expect = 0u64;
        let mut data = 0u64;
        for r in &index.runs {
            let end = r.offset.checked_add(r.len);
            if r.offset < expect || r.offset % PAGE != 0 || end.is_none_or(|e| e > index.size) {
                return Err(SnapshotError::Malformed(format!(
                    "RAM run at {:#x} (+{:#x}) is out of order or outside RAM",
                    r.offset, r.len
                )));
            }
            expect = end.unwrap_or(u64::MAX);
            data += r.len;
        }
        if index.data_offset < c.pos || index.data_offset % PAGE != 0 {
            return Err(SnapshotError::Malformed("RAM data offset".into()));
        }
        let pad = c.read(index.data_offset - c.pos, "the padding before guest RAM")?;
        if pad.iter().any(|&b| b != 0) {
            return Err(SnapshotError::Checksum {
                what: "the padding before guest RAM".into(),
            });
        }
        if c.pos.checked_add(data).is_none_or(|e| e > len) {
            return Err(SnapshotError::Truncated {
                what: "guest RAM".into(),
                len,
            });
        }
        c.pos += data;
        let (tag, _) = c.section("the end section")?;
        if tag != TAG_END {
            return Err(SnapshotError::Malformed("no end section after RAM".into()));
        }
        if c.pos != len {
            return Err(SnapshotError::Malformed(format!(
                "{} bytes after the end section",
                len - c.pos
            )));
        }
        Ok(Self {
            header,
            config,
            records,
            index,
        })
    }

    /// Guest RAM size.
    pub fn memory(&self) -> u64 {
        self.index.size
    }

    /// Bytes of RAM the file holds.
    pub fn ram_bytes(&self) -> u64 {
        self.index.runs.iter().map(|r| r.len).sum()
    }

    /// The record named `name`.
    pub fn record(&self, name: &str) -> Option<&Record> {
        self.records.iter().find(|r| r.name == name)
    }

    /// Reads the RAM runs from `file` straight into `ram` (which must be zero elsewhere:
    /// a fresh memfd's mapping), checking each run's checksum.
    pub fn fill_ram(&self, file: &File, ram: &mut [u8]) -> Result<(), SnapshotError> {
        if ram.len() as u64 != self.index.size {
            return Err(SnapshotError::Malformed(format!(
                "RAM is {} bytes, the snapshot's {}",
                ram.len(),
                self.index.size
            )));
        }
        let mut pos = self.index.data_offset;
        for r in &self.index.runs {
            let dst = &mut ram[r.offset as usize..(r.offset + r.len) as usize];
            file.read_exact_at(dst, pos)?;
            if crc32(dst) != r.crc {
                return Err(SnapshotError::Checksum {
                    what: format!("guest RAM at {:#x}", r.offset),
                });
            }
            pos += r.len;
        }
        Ok(())
    }
}

/// This host's CPU as a snapshot header names it: vendor and `family F model M`, from
/// `/proc/cpuinfo` text.
pub fn host_cpu_from_cpuinfo(text: &str) -> (String, String) {
    let field = |key: &str| {
        text.lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    (
        field("vendor_id"),
        format!("family {} model {}", field("cpu family"), field("model")),
    )
}

/// Refuses a snapshot taken on another kind of CPU than (`vendor`, `model`).
pub fn check_host(header: &Header, vendor: &str, model: &str) -> Result<(), SnapshotError> {
    if header.cpu_vendor != vendor || header.cpu_model != model {
        return Err(SnapshotError::WrongHost {
            taken: format!("{} {}", header.cpu_vendor, header.cpu_model),
            here: format!("{vendor} {model}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    fn header(memory: u64) -> Header {
        Header {
            bulkhead_version: "0.1.0".into(),
            cpu_vendor: "GenuineIntel".into(),
            cpu_model: "family 6 model 85".into(),
            cpu_template: "minimal".into(),
            created_unix: 1,
            memory,
        }
    }

    fn sample_ram() -> Vec<u8> {
        let mut ram = vec![0u8; 64 * PAGE as usize];
        for p in [1usize, 2, 3, 10, 40, 63] {
            ram[p * PAGE as usize + 17] = p as u8;
        }
        ram
    }

    fn written() -> (File, Vec<u8>, WriteStats) {
        let ram = sample_ram();
        let f = tempfile();
        let recs = vec![
            Record {
                name: "vcpu0".into(),
                data: vec![1, 2, 3],
            },
            Record {
                name: "vm".into(),
                data: vec![9; 100],
            },
        ];
        let stats =
            write_snapshot(&f, &header(ram.len() as u64), b"config", &recs, &ram, None).unwrap();
        (f, ram, stats)
    }

    fn tempfile() -> File {
        let fd =
            nix::sys::memfd::memfd_create(c"snap-test", nix::sys::memfd::MemFdCreateFlag::empty())
                .expect("memfd");
        File::from(fd)
    }

    fn copy(f: &File) -> Vec<u8> {
        let mut v = Vec::new();
        let mut g = f.try_clone().unwrap();
        g.rewind().unwrap();
        std::io::Read::read_to_end(&mut g, &mut v).unwrap();
        v
    }

    fn from_bytes(b: &[u8]) -> File {
        let f = tempfile();
        f.write_all_at(b, 0).unwrap();
        f
    }

    #[test]
    fn round_trip_is_sparse() {
        let (f, ram, stats) = written();
        assert_eq!(stats.ram_written, 6 * PAGE);
        let r = SnapshotReader::open(&f).expect("open");
        assert_eq!(r.header, header(ram.len() as u64));
        assert_eq!(r.config, b"config");
        assert_eq!(r.records.len(), 2);
        assert_eq!(r.record("vm").map(|x| x.data.len()), Some(100));
        let mut back = vec![0u8; ram.len()];
        r.fill_ram(&f, &mut back).expect("fill");
        assert_eq!(back, ram);
        assert!(stats.file_len < 12 * PAGE);
    }

    #[test]
    fn runs_merge_adjacent_pages() {
        let runs = ram_runs(&sample_ram(), None);
        let spans: Vec<(u64, u64)> = runs
            .iter()
            .map(|r| (r.offset / PAGE, r.len / PAGE))
            .collect();
        assert_eq!(spans, vec![(1, 3), (10, 1), (40, 1), (63, 1)]);
    }

    #[test]
    fn holes_of_a_memfd_are_skipped() {
        let f = tempfile();
        f.set_len(64 * PAGE).unwrap();
        f.write_all_at(&[7u8; 10], 5 * PAGE).unwrap();
        let mut ram = vec![0u8; 64 * PAGE as usize];
        ram[5 * PAGE as usize..5 * PAGE as usize + 10].fill(7);
        let runs = ram_runs(&ram, Some(&f));
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].offset, runs[0].len), (5 * PAGE, PAGE));
    }

    #[test]
    fn every_truncation_is_refused() {
        let (f, _, _) = written();
        let bytes = copy(&f);
        for cut in (0..bytes.len()).step_by(97).chain([bytes.len() - 1]) {
            let err = SnapshotReader::open(&from_bytes(&bytes[..cut])).unwrap_err();
            assert!(
                matches!(
                    err,
                    SnapshotError::Truncated { .. } | SnapshotError::BadMagic
                ),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn every_corrupted_byte_is_found() {
        let (f, ram, _) = written();
        let bytes = copy(&f);
        for at in (0..bytes.len()).step_by(61) {
            let mut b = bytes.clone();
            b[at] ^= 0x5a;
            let g = from_bytes(&b);
            let verdict = SnapshotReader::open(&g).and_then(|r| {
                let mut back = vec![0u8; ram.len()];
                r.fill_ram(&g, &mut back)
            });
            assert!(verdict.is_err(), "flip at {at} went unnoticed");
        }
    }

    #[test]
    fn wrong_version_and_magic_are_named() {
        let (f, _, _) = written();
        let mut b = copy(&f);
        b[8] = 2;
        let e = SnapshotReader::open(&from_bytes(&b)).unwrap_err();
        assert!(matches!(e, SnapshotError::WrongVersion { found: 2 }), "{e}");
        assert!(e.to_string().contains("version 2"));
        b[0] = b'X';
        assert!(matches!(
            SnapshotReader::open(&from_bytes(&b)).unwrap_err(),
            SnapshotError::BadMagic
        ));
    }

    #[test]
    fn host_check() {
        let h = header(0);
        assert!(check_host(&h, "GenuineIntel", "family 6 model 85").is_ok());
        let e = check_host(&h, "AuthenticAMD", "family 25 model 1").unwrap_err();
        assert!(e.to_string().contains("AuthenticAMD"));
        let (v, m) = host_cpu_from_cpuinfo(
            "vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\nmodel name\t: X\n",
        );
        assert_eq!(
            (v.as_str(), m.as_str()),
            ("GenuineIntel", "family 6 model 85")
        );
    }
}
