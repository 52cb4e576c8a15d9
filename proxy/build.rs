//! Compiles the kernel relay's eBPF program (bpf/kernel_relay.bpf.c) with clang, which
//! `make` installs with the other build dependencies.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "bpf/kernel_relay.bpf.c";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("kernel_relay.bpf.o");
    let status = Command::new(std::env::var("CLANG").unwrap_or_else(|_| "clang".into()))
        .args(["-O2", "-target", "bpf", "-c", source, "-o"])
        .arg(&object)
        .status()
        .unwrap_or_else(|error| panic!("running clang to compile {source}: {error}"));
    assert!(status.success(), "clang could not compile {source}");
}
