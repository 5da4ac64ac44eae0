//! The snapshot file reader (`bulkhead restore` hands `bulkheadd` a file it did not write):
//! header, sections, the RAM index and RAM checksums, and the runner's record decoder, on
//! hostile bytes. Invariants: no panic; an accepted file's RAM fits its header's size and
//! its index lies inside the file; whatever is refused is refused with an error.

use std::fs::File;
use std::os::unix::fs::FileExt;

use bulkhead_ipc::runner::StateRecord;
use core_vmm::snapshot::format::{self, Header, Record, SnapshotError, SnapshotReader};
use core_vmm::snapshot::records::VmSnapshot;

fn memfd() -> File {
    let fd = nix::sys::memfd::memfd_create(
        c"fuzz-snapshot",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .expect("memfd");
    File::from(fd)
}

/// Reads `data` as a snapshot file.
pub fn run(data: &[u8]) -> u64 {
    let f = memfd();
    f.write_all_at(data, 0).expect("write");
    let r = match SnapshotReader::open(&f) {
        Ok(r) => r,
        Err(e) => {
            return match e {
                SnapshotError::Io(_) => 1,
                SnapshotError::BadMagic => 2,
                SnapshotError::WrongVersion { .. } => 3,
                SnapshotError::Truncated { .. } => 4,
                SnapshotError::Checksum { .. } => 5,
                SnapshotError::Malformed(_) => 6,
                SnapshotError::WrongHost { .. } => 7,
            }
        }
    };
    assert!(
        r.ram_bytes() <= r.memory(),
        "more RAM written than there is"
    );
    assert!(
        r.ram_bytes() <= data.len() as u64,
        "the index claims more RAM than the file holds"
    );
    let mut sig = 10;
    if r.memory() <= 1 << 20 {
        let mut ram = vec![0u8; r.memory() as usize];
        sig += u64::from(r.fill_ram(&f, &mut ram).is_ok());
    }
    let records: Vec<StateRecord> = r
        .records
        .iter()
        .map(|x| StateRecord {
            name: x.name.clone(),
            data: x.data.clone(),
        })
        .collect();
    sig + 2 * u64::from(VmSnapshot::from_records(&records).is_ok())
}

/// A valid snapshot of 16 pages (three written), and its cut and bit-flipped variants.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut ram = vec![0u8; 16 * 4096];
    ram[4096] = 1;
    ram[2 * 4096 + 7] = 2;
    ram[9 * 4096 + 4095] = 3;
    let header = Header {
        bulkhead_version: "0.1.0".into(),
        cpu_vendor: "GenuineIntel".into(),
        cpu_model: "family 6 model 85".into(),
        cpu_template: "minimal".into(),
        created_unix: 0,
        memory: ram.len() as u64,
    };
    let records = vec![Record {
        name: "vm".into(),
        data: vec![2, 0, 0],
    }];
    let f = memfd();
    format::write_snapshot(&f, &header, b"{}", &records, &ram, None).expect("write");
    let len = f.metadata().expect("len").len() as usize;
    let mut whole = vec![0u8; len];
    f.read_exact_at(&mut whole, 0).expect("read");
    let mut out = vec![
        whole.clone(),
        whole[..len / 2].to_vec(),
        whole[..40].to_vec(),
    ];
    let mut flipped = whole.clone();
    flipped[30] ^= 1;
    out.push(flipped);
    out
}
