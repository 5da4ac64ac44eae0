//! Disks end to end: the runner's virtio-pci + vhost-user frontend against real vhost-user-blk
//! backends (qemu-storage-daemon, bulkhead-blk), driven by the test guest's virtio-blk driver.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const DEADLINE: Duration = Duration::from_secs(60);

/// qemu-storage-daemon exporting `image` as vhost-user-blk on `sock`; killed on drop.
struct StorageDaemon(std::process::Child);

impl StorageDaemon {
    fn start(
        qsd: &std::path::Path,
        image: &std::path::Path,
        sock: &std::path::Path,
        queues: u32,
    ) -> Self {
        let child = Command::new(qsd)
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=file,filename={}", image.display()))
            .args(["--blockdev", "driver=raw,node-name=disk,file=file", "--export"])
            .arg(format!(
                "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                sock.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let me = StorageDaemon(child);
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                std::time::Instant::now() < end,
                "qemu-storage-daemon did not create {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn runner_with_qemu_storage_daemon_round_trips_the_pattern() {
    let name = "runner_with_qemu_storage_daemon_round_trips_the_pattern";
    if !kvm_available(name) {
        return;
    }
    let Some(qsd) = tool(name, "qemu-storage-daemon") else {
        return;
    };
    let (dir, img) = temp_image("qsd", 64);
    let sock = dir.join("qsd.sock");
    let daemon = StorageDaemon::start(&qsd, &img, &sock, 2);
    let mut c = runner_guest(
        "blk blk-id blk-queues=2 blk-write=7:100:2048 blk-read=100:2048 blk-verify=7:100:2048 exit=0",
        2,
        "256M",
    );
    c.arg("--disk-socket").arg(&sock);
    let out = run(c, DEADLINE);
    drop(daemon);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(
        out.stdout.contains("blk-write: 2048 sectors ok status 0"),
        "{}",
        out.dump()
    );
    assert!(out.stdout.contains("blk-verify: ok"), "{}", out.dump());
    assert!(
        out.stdout.contains("blk-mq: 2 queues used"),
        "{}",
        out.dump()
    );
    let sums: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("blk-checksum:"))
        .collect();
    assert_eq!(sums.len(), 2, "{}", out.dump());
    assert_eq!(
        sums[0], sums[1],
        "read-back checksum equals the written one"
    );
    // The host finds exactly the pattern on the image, and nothing outside the range.
    assert_eq!(blk_image_mismatch(&img, 7, 100, 2048), None);
    let data = std::fs::read(&img).expect("image");
    assert!(
        data[..100 * 512].iter().all(|b| *b == 0),
        "sectors before the range untouched"
    );
    assert!(
        data[2148 * 512..2148 * 512 + 4096].iter().all(|b| *b == 0),
        "sectors after the range untouched"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
