// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The machine a benchmark ran on, recorded in every result.
//!
//! [`Machine::detect`] reads `/proc/cpuinfo`, `/proc/meminfo`, `/proc/sys/kernel/*` and
//! `/sys/module` (falling back to the kernel log when `/dev/kvm` exists but no vendor module is
//! listed) and, on x86-64, the CPUID hypervisor leaf. It never fails: whatever cannot be
//! read is `None` (serialised as `null`, shown as "not recorded" by the report).
//!
//! The KVM flavour ([`KvmFlavour`]) matters for every KVM figure: under PVM (a software
//! hypervisor, often nested) a write-protect fault costs ~7 µs instead of well under one.
//!
//! Not here: measuring anything, or the per-run conditions (those are fields of each result).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Which KVM implementation serves `/dev/kvm` on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvmFlavour {
    /// PVM, the paravirtualised software hypervisor (module `kvm_pvm`).
    #[serde(rename = "PVM")]
    Pvm,
    /// Hardware virtualisation on Intel VT-x (module `kvm_intel`).
    #[serde(rename = "kvm-intel")]
    KvmIntel,
    /// Hardware virtualisation on AMD-V (module `kvm_amd`).
    #[serde(rename = "kvm-amd")]
    KvmAmd,
    /// `/dev/kvm` exists but the vendor module could not be identified.
    #[serde(rename = "kvm")]
    Unknown,
    /// No KVM on this machine.
    #[serde(rename = "none")]
    None,
}

impl KvmFlavour {
    /// The name used in results and reports ("PVM", "kvm-intel", "kvm-amd", "kvm", "none").
    pub fn name(self) -> &'static str {
        match self {
            KvmFlavour::Pvm => "PVM",
            KvmFlavour::KvmIntel => "kvm-intel",
            KvmFlavour::KvmAmd => "kvm-amd",
            KvmFlavour::Unknown => "kvm",
            KvmFlavour::None => "none",
        }
    }
}

/// A description of the machine: enough to tell whether two results are comparable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// Host name.
    pub hostname: Option<String>,
    /// CPU model (`model name` in `/proc/cpuinfo`).
    pub cpu_model: Option<String>,
    /// Logical CPUs online.
    pub cores: Option<u32>,
    /// Physical memory (`MemTotal`), bytes.
    pub mem_bytes: Option<u64>,
    /// Kernel release (`uname -r`).
    pub kernel: Option<String>,
    /// KVM flavour.
    pub kvm: KvmFlavour,
    /// When this machine is itself a virtual machine: the hypervisor it runs under, from the
    /// CPUID hypervisor signature (e.g. "KVMKVMKVM"), so nested setups are visible.
    pub hypervisor: Option<String>,
}

impl Machine {
    /// Describes the machine this process runs on.
    pub fn detect() -> Machine {
        let cpuinfo = read("/proc/cpuinfo");
        Machine {
            hostname: read("/proc/sys/kernel/hostname").and_then(non_empty),
            cpu_model: cpuinfo.as_deref().and_then(cpu_model),
            cores: cpuinfo.as_deref().and_then(cpu_count).or_else(|| {
                std::thread::available_parallelism()
                    .ok()
                    .and_then(|n| u32::try_from(n.get()).ok())
            }),
            mem_bytes: read("/proc/meminfo").as_deref().and_then(mem_total),
            kernel: read("/proc/sys/kernel/osrelease").and_then(non_empty),
            kvm: match kvm_flavour(Path::new("/sys/module"), Path::new("/dev/kvm").exists()) {
                // Built-in modules without parameters leave no /sys/module entry; the kernel
                // log still names PVM.
                KvmFlavour::Unknown if dmesg_mentions_pvm() => KvmFlavour::Pvm,
                f => f,
            },
            hypervisor: cpuid_hypervisor(),
        }
    }

    /// One line for humans, e.g.
    /// `AMD EPYC, 2 CPUs, 24.0 GiB, Linux 6.18.44, KVM: PVM (under KVMKVMKVM), host vm`.
    pub fn summary(&self) -> String {
        let mut s = self
            .cpu_model
            .clone()
            .unwrap_or_else(|| "unknown CPU".to_owned());
        if let Some(c) = self.cores {
            s.push_str(&format!(", {c} CPUs"));
        }
        if let Some(m) = self.mem_bytes {
            s.push_str(&format!(", {:.1} GiB", bytes_to_gib(m)));
        }
        if let Some(k) = &self.kernel {
            s.push_str(&format!(", Linux {k}"));
        }
        s.push_str(&format!(", KVM: {}", self.kvm.name()));
        if let Some(h) = &self.hypervisor {
            s.push_str(&format!(" (under {h})"));
        }
        if let Some(h) = &self.hostname {
            s.push_str(&format!(", host {h}"));
        }
        s
    }
}

#[allow(clippy::cast_precision_loss)] // Display only.
fn bytes_to_gib(b: u64) -> f64 {
    b as f64 / f64::from(1u32 << 30)
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn non_empty(s: String) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

/// `model name` of the first processor (x86), else `Model`/`Hardware` (Arm boards), else
/// `cpu model` (some other architectures).
fn cpu_model(cpuinfo: &str) -> Option<String> {
    for key in ["model name", "Model", "Hardware", "cpu model"] {
        for line in cpuinfo.lines() {
            if let Some((k, v)) = line.split_once(':')
                && k.trim() == key
                && !v.trim().is_empty()
            {
                return Some(v.trim().to_owned());
            }
        }
    }
    None
}

fn cpu_count(cpuinfo: &str) -> Option<u32> {
    let n = cpuinfo
        .lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(k, _)| k.trim() == "processor")
        })
        .count();
    u32::try_from(n).ok().filter(|&n| n > 0)
}

fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut it = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") | None => n.checked_mul(1024),
        Some(_) => None,
    }
}

/// PVM if its module is loaded (`kvm_pvm`), else the hardware vendor module, else "kvm" when
/// `/dev/kvm` exists anyway (e.g. built into the kernel without parameters), else none.
fn kvm_flavour(sys_module: &Path, dev_kvm: bool) -> KvmFlavour {
    if sys_module.join("kvm_pvm").exists() {
        KvmFlavour::Pvm
    } else if sys_module.join("kvm_intel").exists() {
        KvmFlavour::KvmIntel
    } else if sys_module.join("kvm_amd").exists() {
        KvmFlavour::KvmAmd
    } else if dev_kvm || sys_module.join("kvm").exists() {
        KvmFlavour::Unknown
    } else {
        KvmFlavour::None
    }
}

/// Whether the kernel log (`dmesg`, readable by root) mentions the `kvm_pvm` module.
fn dmesg_mentions_pvm() -> bool {
    std::process::Command::new("dmesg")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("kvm_pvm"))
}

/// The CPUID hypervisor vendor signature (leaf 0x4000_0000), when CPUID says a hypervisor is
/// present (leaf 1, ECX bit 31).
#[cfg(target_arch = "x86_64")]
fn cpuid_hypervisor() -> Option<String> {
    use std::arch::x86_64::__cpuid;
    // CPUID is always available on x86-64 and has no side effects.
    let leaf1 = __cpuid(1);
    if leaf1.ecx & (1 << 31) == 0 {
        return None;
    }
    let hv = __cpuid(0x4000_0000);
    let mut sig = Vec::with_capacity(12);
    for reg in [hv.ebx, hv.ecx, hv.edx] {
        sig.extend_from_slice(&reg.to_le_bytes());
    }
    let s: String = sig
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| char::from(b))
        .collect();
    let s = s.trim().to_owned();
    Some(if s.is_empty() {
        "unknown".to_owned()
    } else {
        s
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn cpuid_hypervisor() -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpuinfo_and_meminfo() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\n\
                       processor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_count(cpuinfo), Some(2));
        assert_eq!(cpu_count("nothing here"), None);
        let arm = "processor\t: 0\nBogoMIPS\t: 108.00\n\nModel\t: Raspberry Pi 4 Model B\n";
        assert_eq!(cpu_model(arm).as_deref(), Some("Raspberry Pi 4 Model B"));
        let meminfo = "MemTotal:       24608132 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total(meminfo), Some(24_608_132 * 1024));
        assert_eq!(mem_total("MemFree: 3 kB\n"), None);
    }

    #[test]
    fn kvm_flavour_from_sys_module() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let m = dir.path();
        assert_eq!(kvm_flavour(m, false), KvmFlavour::None);
        assert_eq!(kvm_flavour(m, true), KvmFlavour::Unknown);
        std::fs::create_dir(m.join("kvm"))?;
        assert_eq!(kvm_flavour(m, false), KvmFlavour::Unknown);
        std::fs::create_dir(m.join("kvm_amd"))?;
        assert_eq!(kvm_flavour(m, true), KvmFlavour::KvmAmd);
        std::fs::create_dir(m.join("kvm_intel"))?;
        assert_eq!(kvm_flavour(m, true), KvmFlavour::KvmIntel);
        // PVM wins: it is loaded beside the hardware module on PVM hosts.
        std::fs::create_dir(m.join("kvm_pvm"))?;
        assert_eq!(kvm_flavour(m, true), KvmFlavour::Pvm);
        Ok(())
    }

    #[test]
    fn detect_describes_this_machine() {
        let m = Machine::detect();
        // Linux always has these.
        assert!(m.kernel.is_some(), "{m:?}");
        assert!(m.cores.is_some_and(|c| c >= 1), "{m:?}");
        assert!(m.mem_bytes.is_some_and(|b| b > 1 << 20), "{m:?}");
        let expect = kvm_flavour(Path::new("/sys/module"), Path::new("/dev/kvm").exists());
        assert_eq!(m.kvm, expect);
        let v = serde_json::to_value(&m).expect("serialise");
        assert_eq!(v["kvm"], serde_json::json!(m.kvm.name()));
        let back: Machine = serde_json::from_value(v).expect("deserialise");
        assert_eq!(back, m);
        eprintln!("this machine: {}", m.summary());
    }
}
