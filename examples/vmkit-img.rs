// SPDX-License-Identifier: Apache-2.0 OR MIT
//! `vmkit-img`: a small qemu-img work-alike built on `vmkit-block`.
//!
//! ```text
//! cargo run --release --example vmkit-img -- info [--output json] [-f fmt] FILE
//! cargo run --release --example vmkit-img -- check [--repair] [--output json] FILE
//! cargo run --release --example vmkit-img -- convert [-f fmt] [-T src_cache] [-t dst_cache]
//!       [-n [--target-is-zero]] -O raw|qcow2|vpc|vhdx [-o opts] [-p] SRC DST
//! cargo run --release --example vmkit-img -- create -f fmt [-o opts] [-b backing [-F fmt]] FILE [SIZE]
//! cargo run --release --example vmkit-img -- compare [-f fmt] [-F fmt] [-s] A B
//! cargo run --release --example vmkit-img -- bench [-c count] [-d depth] [-f fmt] [-o offset]
//!       [-s size] [-S step] [-t cache] [-w] [--pattern N] [--flush-interval N] [--random] FILE
//! ```
//!
//! Formats are detected from the content; `-f` only asserts what the file must be.
//! Exit codes follow qemu-img: `check` returns 2 for corruptions, 3 for leaks only and
//! 63 for formats without a check; `compare` returns 1 when the images differ.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use vmkit::block::qcow2::{self, CreateOptions, Qcow2Backend};
use vmkit::block::raw::RawBackend;
use vmkit::block::vhdx::{VhdxBackend, VhdxCreateOptions, VhdxSubformat};
use vmkit::block::vm_memory::VolatileSlice;
use vmkit::block::vpc::{VpcBackend, VpcCreateOptions, VpcSubformat};
use vmkit::block::{
    open_image, probe_path, read_at, BlockBackend, BlockError, CacheMode, ImageFormat, OpenOptions,
};

type Res<T> = Result<T, String>;

const USAGE: &str = "usage: vmkit-img <command> [options]
commands:
  info [--output human|json] [-f fmt] FILE
  check [--repair] [--output human|json] [-f fmt] FILE
  convert [-f fmt] [-T src_cache] [-t dst_cache (default unsafe)]
          [-n [--target-is-zero]] -O raw|qcow2|vpc|vhdx [-o opts] [-p|-q] SRC DST
  create -f raw|qcow2|vpc|vhdx [-o opts] [-b backing [-F fmt]] FILE [SIZE]
  compare [-f fmt] [-F fmt] [-s] [-p] A B
  bench [-c count] [-d depth] [-f fmt] [-o offset] [-s size] [-S step] [-t cache]
        [-w] [--pattern N] [--flush-interval N] [--random] [-q] FILE
create/convert options (-o a=b,c=d):
  qcow2: compat=0.10|1.1, cluster_size=SIZE, extended_l2=on|off, refcount_bits=N,
         backing_file=NAME, backing_fmt=FMT
  vpc:   subformat=dynamic|fixed, force_size=on|off
  vhdx:  subformat=dynamic|fixed, block_size=SIZE, log_size=SIZE
sizes take k/M/G/T/P suffixes (powers of 1024).";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(1);
    };
    let rest = &args[1..];
    let r = match cmd.as_str() {
        "info" => cmd_info(rest),
        "check" => cmd_check(rest),
        "convert" => cmd_convert(rest),
        "create" => cmd_create(rest),
        "compare" => cmd_compare(rest),
        "bench" => cmd_bench(rest),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vmkit-img: {e}");
            ExitCode::from(1)
        }
    }
}

// ------------------------------------------------------------------ argument parsing

/// Options and positional arguments. `with_value` lists the options that take a value.
struct Args {
    opts: Vec<(String, Option<String>)>,
    pos: Vec<String>,
}

impl Args {
    fn parse(args: &[String], with_value: &[&str], flags: &[&str]) -> Res<Args> {
        let mut opts = Vec::new();
        let mut pos = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let a = &args[i];
            if a == "--" {
                pos.extend(args[i + 1..].iter().cloned());
                break;
            }
            if a.starts_with('-') && a.len() > 1 {
                let (name, inline) = match a.split_once('=') {
                    Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
                    _ => (a.clone(), None),
                };
                if with_value.contains(&name.as_str()) {
                    let v = match inline {
                        Some(v) => v,
                        None => {
                            i += 1;
                            args.get(i)
                                .cloned()
                                .ok_or_else(|| format!("option {name} needs a value"))?
                        }
                    };
                    opts.push((name, Some(v)));
                } else if flags.contains(&name.as_str()) {
                    opts.push((name, None));
                } else {
                    return Err(format!("unknown option {a}"));
                }
            } else {
                pos.push(a.clone());
            }
            i += 1;
        }
        Ok(Args { opts, pos })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.opts
            .iter()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, v)| v.as_deref())
            .collect()
    }

    fn flag(&self, name: &str) -> bool {
        self.opts.iter().any(|(n, _)| n == name)
    }

    fn num(&self, name: &str, default: u64) -> Res<u64> {
        match self.get(name) {
            Some(v) => parse_size(v),
            None => Ok(default),
        }
    }
}

/// Parses "4096", "64k", "1.5G", "2M" (powers of 1024).
fn parse_size(s: &str) -> Res<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                _ => return Err(format!("bad size suffix in {s:?}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .ok_or_else(|| format!("size {s:?} is too large"));
    }
    let f: f64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    if f.is_nan() || f < 0.0 || f * mult as f64 > u64::MAX as f64 {
        return Err(format!("bad size {s:?}"));
    }
    Ok((f * mult as f64) as u64)
}

/// Parses "-o a=b,c=d" (several -o accumulate).
fn parse_kv(list: &[&str]) -> Res<Vec<(String, String)>> {
    let mut out = Vec::new();
    for l in list {
        for item in l.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("option {item:?} must be key=value"))?;
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(out)
}

fn on_off(k: &str, v: &str) -> Res<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("option {k} must be on or off, not {v:?}")),
    }
}

fn static_fmt(name: &str) -> Res<&'static str> {
    ImageFormat::from_name(name)
        .map(ImageFormat::name)
        .map_err(|e| e.to_string())
}

fn err(e: BlockError) -> String {
    e.to_string()
}

fn open(
    path: &str,
    fmt: Option<&str>,
    read_only: bool,
    cache: CacheMode,
) -> Res<Arc<dyn BlockBackend>> {
    let format = fmt.map(static_fmt).transpose()?;
    open_image(
        path,
        OpenOptions {
            read_only,
            cache,
            format,
            no_backing: false,
        },
    )
    .map_err(err)
}

fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.3} {}", U[i]).replace(".000 ", " ")
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

// ------------------------------------------------------------------ info

fn cmd_info(args: &[String]) -> Res<u8> {
    let a = Args::parse(args, &["--output", "-f"], &["-U", "--backing-chain"])?;
    let [file] = a.pos.as_slice() else {
        return Err("info needs exactly one FILE".into());
    };
    let json = match a.get("--output").unwrap_or("human") {
        "json" => true,
        "human" => false,
        o => return Err(format!("--output must be human or json, not {o:?}")),
    };
    let img = open(file, a.get("-f"), true, CacheMode::Writeback)?;
    let q = if img.format() == "qcow2" {
        Some(
            Qcow2Backend::open(
                Path::new(file),
                &OpenOptions {
                    no_backing: true,
                    ..OpenOptions::read_only()
                },
            )
            .map_err(err)?,
        )
    } else {
        None
    };
    let chain = img.backing_chain();
    let mut fields: Vec<(&str, String, String)> = Vec::new(); // key, human, json
    fields.push(("filename", file.clone(), json_str(file)));
    fields.push(("format", img.format().into(), json_str(img.format())));
    let vs = img.virtual_size();
    fields.push((
        "virtual-size",
        format!("{} ({vs} bytes)", human(vs)),
        vs.to_string(),
    ));
    if let Some(alloc) = img.allocated_size() {
        fields.push(("actual-size", human(alloc), alloc.to_string()));
    }
    if let Some(q) = &q {
        let h = q.header();
        fields.push((
            "cluster-size",
            h.cluster_size().to_string(),
            h.cluster_size().to_string(),
        ));
        if let Some(b) = &h.backing_file {
            let b = b.to_string_lossy();
            fields.push(("backing-filename", b.to_string(), json_str(&b)));
        }
        if let Some(f) = &h.backing_format {
            fields.push(("backing-filename-format", f.clone(), json_str(f)));
        }
        let dirty = h.incompatible & qcow2::header::INCOMPAT_DIRTY != 0;
        fields.push(("dirty-flag", dirty.to_string(), dirty.to_string()));
    }
    if json {
        let mut o = String::from("{\n");
        for (k, _, j) in &fields {
            o.push_str(&format!("    {}: {j},\n", json_str(k)));
        }
        o.push_str("    \"backing-chain\": [");
        for (i, (p, f)) in chain.iter().enumerate() {
            if i > 0 {
                o.push(',');
            }
            o.push_str(&format!(
                "\n        {{\"filename\": {}, \"format\": {}}}",
                json_str(&p.to_string_lossy()),
                json_str(f)
            ));
        }
        o.push_str(if chain.is_empty() { "]" } else { "\n    ]" });
        if let Some(q) = &q {
            let h = q.header();
            o.push_str(&format!(
                ",\n    \"format-specific\": {{\n        \"type\": \"qcow2\",\n        \"data\": {{\n            \"compat\": {},\n            \"compression-type\": {},\n            \"lazy-refcounts\": {},\n            \"refcount-bits\": {},\n            \"corrupt\": {},\n            \"extended-l2\": {}\n        }}\n    }}",
                json_str(if h.version == 2 { "0.10" } else { "1.1" }),
                json_str(match h.compression {
                    qcow2::header::CompressionType::Zlib => "zlib",
                    qcow2::header::CompressionType::Zstd => "zstd",
                }),
                h.compatible & qcow2::header::COMPAT_LAZY_REFCOUNTS != 0,
                h.refcount_bits(),
                h.incompatible & qcow2::header::INCOMPAT_CORRUPT != 0,
                h.extended_l2()
            ));
        }
        o.push_str("\n}");
        println!("{o}");
    } else {
        for (k, hum, _) in &fields {
            println!("{k}: {hum}");
        }
        if let Some(q) = &q {
            let h = q.header();
            println!("Format specific information:");
            println!(
                "    compat: {}",
                if h.version == 2 { "0.10" } else { "1.1" }
            );
            println!(
                "    compression type: {}",
                match h.compression {
                    qcow2::header::CompressionType::Zlib => "zlib",
                    qcow2::header::CompressionType::Zstd => "zstd",
                }
            );
            println!("    refcount bits: {}", h.refcount_bits());
            println!(
                "    corrupt: {}",
                h.incompatible & qcow2::header::INCOMPAT_CORRUPT != 0
            );
            println!("    extended l2: {}", h.extended_l2());
        }
        if !chain.is_empty() {
            println!("backing chain:");
            for (p, f) in &chain {
                println!("    {} ({f})", p.display());
            }
        }
    }
    Ok(0)
}

// ------------------------------------------------------------------ check

fn cmd_check(args: &[String]) -> Res<u8> {
    let a = Args::parse(args, &["--output", "-f", "-r"], &["--repair", "-q", "-U"])?;
    let [file] = a.pos.as_slice() else {
        return Err("check needs exactly one FILE".into());
    };
    let json = a.get("--output") == Some("json");
    let repair = a.flag("--repair") || a.get("-r").is_some();
    let fmt = probe_path(Path::new(file)).map_err(err)?;
    if let Some(f) = a.get("-f") {
        if static_fmt(f)? != fmt.name() {
            return Err(format!(
                "{file}: the image is not {f} (its content says {})",
                fmt.name()
            ));
        }
    }
    if fmt != ImageFormat::Qcow2 {
        // Opening still validates the metadata of the other formats.
        open(file, None, true, CacheMode::Writeback)?;
        println!("This image format ({}) does not support checks", fmt.name());
        return Ok(63);
    }
    let rep = if repair {
        let q = Qcow2Backend::open_for_repair(Path::new(file)).map_err(err)?;
        let before = q.check().map_err(err)?;
        let after = q.repair().map_err(err)?;
        if !json {
            println!(
                "Repairing: {} corruptions and {} leaked clusters found; {} fixes applied.",
                before.corruptions.len(),
                before.leaks.len(),
                after.fixed
            );
        }
        after
    } else {
        let q = Qcow2Backend::open(
            Path::new(file),
            &OpenOptions {
                no_backing: true,
                ..OpenOptions::read_only()
            },
        )
        .map_err(err)?;
        q.check().map_err(err)?
    };
    let code = if !rep.corruptions.is_empty() {
        2
    } else if !rep.leaks.is_empty() {
        3
    } else {
        0
    };
    if json {
        println!(
            "{{\n    \"filename\": {},\n    \"format\": \"qcow2\",\n    \"check-errors\": {},\n    \"leaks\": {},\n    \"corruptions\": {},\n    \"image-end-offset\": {},\n    \"total-clusters\": {},\n    \"allocated-clusters\": {},\n    \"compressed-clusters\": {}\n}}",
            json_str(file),
            0,
            rep.leaks.len(),
            rep.corruptions.len(),
            rep.image_end_offset,
            rep.total_clusters,
            rep.allocated_clusters,
            rep.compressed_clusters
        );
    } else {
        for c in &rep.corruptions {
            println!("ERROR {c}");
        }
        for l in &rep.leaks {
            println!("Leaked cluster: {l}");
        }
        if rep.is_clean() {
            println!("No errors were found on the image.");
        } else {
            if !rep.corruptions.is_empty() {
                println!(
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                    rep.corruptions.len()
                );
            }
            if !rep.leaks.is_empty() {
                println!(
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                    rep.leaks.len()
                );
            }
        }
        if rep.marked_corrupt {
            println!("The image is marked corrupt.");
        }
        let pct = |n: u64| {
            if rep.total_clusters == 0 {
                0.0
            } else {
                n as f64 * 100.0 / rep.total_clusters as f64
            }
        };
        println!(
            "{}/{} = {:.2}% allocated, {:.2}% compressed clusters",
            rep.allocated_clusters,
            rep.total_clusters,
            pct(rep.allocated_clusters),
            pct(rep.compressed_clusters)
        );
        println!("Image end offset: {}", rep.image_end_offset);
    }
    Ok(code)
}

// ------------------------------------------------------------------ create

fn create_image(
    fmt: &str,
    path: &Path,
    size: Option<u64>,
    kv: &[(String, String)],
    backing: Option<(&str, Option<&str>)>,
) -> Res<()> {
    let unknown = |k: &str| Err(format!("{fmt} does not know the option {k:?}"));
    // As qemu-img does, image formats get whole 512-byte sectors (QEMU reads a qcow2
    // image's size rounded down to sectors, so an odd size would lose its tail there).
    let size = match size {
        Some(s) if fmt != "raw" => Some(
            s.checked_next_multiple_of(512)
                .ok_or_else(|| format!("size {s} is too large"))?,
        ),
        s => s,
    };
    match fmt {
        "raw" => {
            for (k, v) in kv {
                if !(k == "preallocation" && v == "off") {
                    return unknown(k);
                }
            }
            if backing.is_some() {
                return Err("raw images cannot have a backing file".into());
            }
            let size = size.ok_or("create needs a SIZE")?;
            RawBackend::create(path, size).map_err(err)
        }
        "qcow2" => {
            let mut o = CreateOptions {
                size,
                ..CreateOptions::default()
            };
            if let Some((b, f)) = backing {
                o.backing_file = Some(b.to_string());
                o.backing_format = f.map(str::to_string);
            }
            for (k, v) in kv {
                match k.as_str() {
                    "compat" => {
                        o.version = match v.as_str() {
                            "0.10" | "v2" => 2,
                            "1.1" | "v3" => 3,
                            _ => return Err(format!("compat must be 0.10 or 1.1, not {v:?}")),
                        }
                    }
                    "cluster_size" => o.cluster_size = parse_size(v)?,
                    "extended_l2" => o.extended_l2 = on_off(k, v)?,
                    "refcount_bits" => {
                        o.refcount_bits =
                            v.parse().map_err(|_| format!("bad refcount_bits {v:?}"))?
                    }
                    "backing_file" => o.backing_file = Some(v.clone()),
                    "backing_fmt" => o.backing_format = Some(v.clone()),
                    "preallocation" if v == "off" => {}
                    "lazy_refcounts" if v == "off" => {}
                    "compression_type" if v == "zlib" => {}
                    _ => return unknown(k),
                }
            }
            qcow2::create(path, &o).map_err(err)
        }
        "vpc" => {
            let mut o = VpcCreateOptions::default();
            for (k, v) in kv {
                match k.as_str() {
                    "subformat" => {
                        o.subformat = match v.as_str() {
                            "dynamic" => VpcSubformat::Dynamic,
                            "fixed" => VpcSubformat::Fixed,
                            _ => return Err(format!("vpc subformat {v:?}")),
                        }
                    }
                    "force_size" => o.force_size = on_off(k, v)?,
                    _ => return unknown(k),
                }
            }
            if backing.is_some() {
                return Err("vpc images cannot have a backing file here".into());
            }
            let size = size.ok_or("create needs a SIZE")?;
            VpcBackend::create(path, size, &o).map_err(err)
        }
        "vhdx" => {
            let mut o = VhdxCreateOptions::default();
            for (k, v) in kv {
                match k.as_str() {
                    "subformat" => {
                        o.subformat = match v.as_str() {
                            "dynamic" => VhdxSubformat::Dynamic,
                            "fixed" => VhdxSubformat::Fixed,
                            _ => return Err(format!("vhdx subformat {v:?}")),
                        }
                    }
                    "block_size" => {
                        o.block_size = u32::try_from(parse_size(v)?)
                            .map_err(|_| format!("block_size {v} too large"))?
                    }
                    "log_size" => {
                        o.log_size = u32::try_from(parse_size(v)?)
                            .map_err(|_| format!("log_size {v} too large"))?
                    }
                    _ => return unknown(k),
                }
            }
            if backing.is_some() {
                return Err("vhdx images cannot have a backing file here".into());
            }
            let size = size.ok_or("create needs a SIZE")?;
            VhdxBackend::create(path, size, &o).map_err(err)
        }
        other => Err(format!("unknown format {other:?} (raw, qcow2, vpc, vhdx)")),
    }
}

fn cmd_create(args: &[String]) -> Res<u8> {
    let a = Args::parse(args, &["-f", "-o", "-b", "-F"], &["-q", "-u"])?;
    let fmt = static_fmt(a.get("-f").unwrap_or("raw"))?;
    let (file, size) = match a.pos.as_slice() {
        [f] => (f, None),
        [f, s] => (f, Some(parse_size(s)?)),
        _ => return Err("create needs FILE [SIZE]".into()),
    };
    let kv = parse_kv(&a.all("-o"))?;
    let backing = a.get("-b").map(|b| (b, a.get("-F")));
    create_image(fmt, Path::new(file), size, &kv, backing)?;
    if !a.flag("-q") {
        let img = open(file, Some(fmt), true, CacheMode::Writeback)?;
        println!("Formatting '{file}', fmt={fmt} size={}", img.virtual_size());
    }
    Ok(0)
}

// ------------------------------------------------------------------ convert

struct Progress {
    enabled: bool,
    last: f64,
}

impl Progress {
    fn new(enabled: bool) -> Self {
        let p = Progress {
            enabled,
            last: -1.0,
        };
        p.draw(0.0);
        p
    }

    fn draw(&self, pct: f64) {
        if self.enabled {
            let mut e = std::io::stderr();
            let _ = write!(e, "\r    ({pct:.2}/100%)");
            let _ = e.flush();
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        if pct - self.last >= 0.5 || (pct >= 100.0 && self.last < 100.0) {
            self.last = pct;
            self.draw(pct);
        }
    }

    fn finish(&mut self) {
        if self.enabled {
            self.update(1, 1);
            eprintln!();
        }
    }
}

/// Bytes read and written per request by `convert`. Large enough that syscalls cost
/// little, and below 2 MiB on purpose: a 2 MiB-aligned 2 MiB buffered write makes the
/// kernel allocate a PMD-sized page-cache folio, which in a VM with free page reporting
/// (virtio-balloon) often comes from memory the host has reclaimed, and refaulting it
/// made such writes up to 5x slower on the test host (`dd bs=2M` vs `bs=1M` shows it).
const CONVERT_CHUNK: u64 = 1 << 20;
/// Granularity of zero detection in `convert`: aligned blocks of this size that hold only
/// zeroes are not written (the fresh destination reads them as zeroes already).
const ZERO_GRAIN: usize = 64 << 10;
/// Chunk buffers each `convert` reader owns (bounds memory and read-ahead).
const BUFS_PER_READER: usize = 4;

/// Whether `b` is all zeroes (compared in 64-byte blocks, which compiles to wide loads).
fn is_zero(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(64);
    blocks.all(|c| c == [0u8; 64]) && blocks.remainder().iter().all(|&x| x == 0)
}

/// Byte ranges (relative to the chunk start at `pos`) of `data` that hold non-zero bytes,
/// at [`ZERO_GRAIN`] granularity aligned to guest offsets, adjacent ranges merged.
fn nonzero_runs(pos: u64, data: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut a = 0usize;
    while a < data.len() {
        // Align block ends to guest offsets so partial chunks keep the grain aligned.
        let to_grain = ZERO_GRAIN - ((pos + a as u64) % ZERO_GRAIN as u64) as usize;
        let b = (a + to_grain).min(data.len());
        if !is_zero(&data[a..b]) {
            match runs.last_mut() {
                Some(r) if r.1 == a => r.1 = b,
                _ => runs.push((a, b)),
            }
        }
        a = b;
    }
    runs
}

/// A piece of the source for `convert` to copy.
#[derive(Clone, Copy)]
struct Chunk {
    pos: u64,
    len: u64,
    /// The source may hold data here (else it is known to read as zeroes).
    data: bool,
}

/// The extents of `src`: those that may hold data cut into chunks of at most
/// [`CONVERT_CHUNK`] bytes, those known to read as zeroes whole (left out entirely when
/// the destination reads as zeroes already, `target_is_zero`).
fn source_chunks(src: &dyn BlockBackend, target_is_zero: bool) -> Res<Vec<Chunk>> {
    let size = src.virtual_size();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let st = src
            .block_status(pos, (size - pos).min(1 << 30))
            .map_err(err)?;
        let n = st.len.max(1).min(size - pos);
        if !st.zero {
            let mut done = 0;
            while done < n {
                // Cut at CONVERT_CHUNK-aligned guest offsets so requests stay aligned.
                let p = pos + done;
                let k = (CONVERT_CHUNK - p % CONVERT_CHUNK).min(n - done);
                out.push(Chunk {
                    pos: p,
                    len: k,
                    data: true,
                });
                done += k;
            }
        } else if !target_is_zero {
            out.push(Chunk {
                pos,
                len: n,
                data: false,
            });
        }
        pos += n;
    }
    Ok(out)
}

/// A chunk read by a `convert` reader thread, on its way to the writer.
struct ReadChunk {
    index: usize,
    reader: usize,
    buf: Vec<u8>,
    /// Non-zero byte ranges of `buf` to write.
    runs: Vec<(usize, usize)>,
}

/// Copies `src` into `dst`. When `target_is_zero` (a freshly created destination), only
/// non-zero bytes are written; otherwise the zero areas are zeroed with `write_zeroes`.
///
/// Reader threads read chunks in parallel and find their zero blocks, while this thread
/// writes the chunks in guest order (so an allocating destination such as qcow2 gets a
/// sequential layout, as with `qemu-img convert` without `-W`).
fn copy_data(
    src: &dyn BlockBackend,
    dst: &dyn BlockBackend,
    target_is_zero: bool,
    progress: &mut Progress,
) -> Res<()> {
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;

    let size = src.virtual_size();
    if dst.virtual_size() < size {
        return Err(format!(
            "the destination ({} bytes) is smaller than the source ({size} bytes)",
            dst.virtual_size()
        ));
    }
    let chunks = source_chunks(src, target_is_zero)?;
    // One core is the writer's; the others read (on 2 cores a second reader only added
    // wake-ups: 10% more CPU and a slower copy when measured).
    let readers = std::thread::available_parallelism()
        .map_or(1, |n| n.get().saturating_sub(1))
        .clamp(1, 4)
        .min(chunks.len().max(1));
    let next_chunk = AtomicUsize::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (done_tx, done_rx) = mpsc::channel::<Result<ReadChunk, String>>();
    let mut give_back = Vec::new();
    let mut reader_rx = Vec::new();
    for _ in 0..readers {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        for _ in 0..BUFS_PER_READER {
            // Cannot fail: the receiver is alive.
            let _ = tx.send(Vec::new());
        }
        give_back.push(tx);
        reader_rx.push(rx);
    }
    std::thread::scope(|s| {
        for (reader, free) in reader_rx.into_iter().enumerate() {
            let done_tx = done_tx.clone();
            let (chunks, next_chunk, stop) = (&chunks, &next_chunk, &stop);
            s.spawn(move || {
                // Take a buffer before claiming a chunk: every buffer parked in the
                // writer's reorder queue then holds a chunk below any unclaimed one, so
                // the chunk the writer waits for is always claimable.
                while let Ok(mut buf) = free.recv() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let index = next_chunk.fetch_add(1, Ordering::Relaxed);
                    let Some(&Chunk { pos, len, data }) = chunks.get(index) else {
                        return;
                    };
                    if !data {
                        // Nothing to read: the writer zeroes the whole chunk.
                        let c = ReadChunk {
                            index,
                            reader,
                            runs: Vec::new(),
                            buf,
                        };
                        if done_tx.send(Ok(c)).is_err() {
                            return;
                        }
                        continue;
                    }
                    if buf.is_empty() {
                        // Allocated on first use (calloc: the pages are only touched by
                        // the first read into them).
                        buf = vec![0u8; CONVERT_CHUNK as usize];
                    }
                    let data = &mut buf[..len as usize];
                    let r = src
                        .read_vectored(pos, &[VolatileSlice::from(&mut *data)])
                        .map_err(err)
                        .map(|()| nonzero_runs(pos, data))
                        .map(|runs| ReadChunk {
                            index,
                            reader,
                            runs,
                            buf,
                        });
                    let failed = r.is_err();
                    if done_tx.send(r).is_err() || failed {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        let r = write_chunks(
            dst,
            &chunks,
            target_is_zero,
            &done_rx,
            &give_back,
            size,
            progress,
        );
        if r.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        // Unblocks readers waiting for a buffer.
        drop(give_back);
        r
    })?;
    dst.flush().map_err(err)
}

/// The writer side of [`copy_data`]: writes chunks in order as they arrive.
fn write_chunks(
    dst: &dyn BlockBackend,
    chunks: &[Chunk],
    target_is_zero: bool,
    done: &std::sync::mpsc::Receiver<Result<ReadChunk, String>>,
    give_back: &[std::sync::mpsc::Sender<Vec<u8>>],
    size: u64,
    progress: &mut Progress,
) -> Res<()> {
    let mut pending = std::collections::BTreeMap::new();
    let mut next = 0usize;
    while next < chunks.len() {
        let c = match pending.remove(&next) {
            Some(c) => c,
            None => {
                let c: ReadChunk = done
                    .recv()
                    .map_err(|_| "convert: a reader thread stopped early".to_string())??;
                if c.index != next {
                    pending.insert(c.index, c);
                    continue;
                }
                c
            }
        };
        let Chunk { pos, len, .. } = chunks[next];
        let mut buf = c.buf;
        // Bytes of the chunk up to which the destination has been written or zeroed.
        let mut covered = 0u64;
        for &(a, b) in &c.runs {
            if !target_is_zero && (a as u64) > covered {
                dst.write_zeroes(pos + covered, a as u64 - covered, true)
                    .map_err(err)?;
            }
            dst.write_vectored(pos + a as u64, &[VolatileSlice::from(&mut buf[a..b])])
                .map_err(err)?;
            covered = b as u64;
        }
        if !target_is_zero && covered < len {
            dst.write_zeroes(pos + covered, len - covered, true)
                .map_err(err)?;
        }
        progress.update(pos + len, size);
        // The reader may have quit already (no more chunks): then drop the buffer.
        let _ = give_back[c.reader].send(buf);
        next += 1;
    }
    progress.update(size, size);
    Ok(())
}

fn cmd_convert(args: &[String]) -> Res<u8> {
    let a = Args::parse(
        args,
        &["-f", "-O", "-o", "-t", "-T"],
        &["-p", "-q", "-U", "-n", "--target-is-zero"],
    )?;
    let [src_path, dst_path] = a.pos.as_slice() else {
        return Err("convert needs SRC and DST".into());
    };
    // -n: the destination exists and is not created; unless --target-is-zero, the areas
    // that read as zeroes in the source are zeroed in it.
    let no_create = a.flag("-n");
    if a.flag("--target-is-zero") && !no_create {
        return Err("--target-is-zero requires -n".into());
    }
    let out_fmt = static_fmt(a.get("-O").unwrap_or("raw"))?;
    // As with qemu-img: -T is the source cache mode (default writeback), -t the
    // destination's (default unsafe: no flush, the caller syncs if it wants to).
    let src_cache: CacheMode = a.get("-T").unwrap_or("writeback").parse().map_err(err)?;
    let cache: CacheMode = a.get("-t").unwrap_or("unsafe").parse().map_err(err)?;
    let src = open(src_path, a.get("-f"), true, src_cache)?;
    let mut kv = parse_kv(&a.all("-o"))?;
    // Keep the exact size for VPC unless asked otherwise.
    if out_fmt == "vpc" && !kv.iter().any(|(k, _)| k == "force_size") {
        kv.push(("force_size".into(), "on".into()));
    }
    let backing = kv
        .iter()
        .find(|(k, _)| k == "backing_file")
        .map(|(_, v)| v.clone());
    if backing.is_some() {
        return Err("convert does not write images with a backing file".into());
    }
    let dst_p = Path::new(dst_path);
    if Path::new(src_path).canonicalize().ok() == dst_p.canonicalize().ok() {
        return Err("source and destination are the same file".into());
    }
    if no_create {
        if a.get("-o").is_some() {
            return Err("-o has no effect with -n (the destination is not created)".into());
        }
    } else {
        create_image(out_fmt, dst_p, Some(src.virtual_size()), &kv, None)?;
    }
    let dst = open(dst_path, Some(out_fmt), false, cache)?;
    let show = a.flag("-p") || (!a.flag("-q") && std::io::stderr().is_terminal());
    let mut progress = Progress::new(show);
    let target_is_zero = !no_create || a.flag("--target-is-zero");
    copy_data(&*src, &*dst, target_is_zero, &mut progress)?;
    progress.finish();
    Ok(0)
}

// ------------------------------------------------------------------ compare

fn cmd_compare(args: &[String]) -> Res<u8> {
    let a = Args::parse(args, &["-f", "-F"], &["-s", "-p", "-q", "-U"])?;
    let [pa, pb] = a.pos.as_slice() else {
        return Err("compare needs two images".into());
    };
    let ia = open(pa, a.get("-f"), true, CacheMode::Writeback)?;
    let ib = open(pb, a.get("-F"), true, CacheMode::Writeback)?;
    let (sa, sb) = (ia.virtual_size(), ib.virtual_size());
    if a.flag("-s") && sa != sb {
        println!("Strict mode: Image size mismatch!");
        return Ok(1);
    }
    let common = sa.min(sb);
    let show = a.flag("-p");
    let mut progress = Progress::new(show);
    const CHUNK: usize = 1 << 20;
    let mut ba = vec![0u8; CHUNK];
    let mut bb = vec![0u8; CHUNK];
    let mut pos = 0u64;
    let total = sa.max(sb);
    while pos < common {
        let n = (common - pos).min(CHUNK as u64) as usize;
        read_at(&*ia, pos, &mut ba[..n]).map_err(err)?;
        read_at(&*ib, pos, &mut bb[..n]).map_err(err)?;
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            progress.finish();
            println!("Content mismatch at offset {}!", pos + i as u64);
            return Ok(1);
        }
        pos += n as u64;
        progress.update(pos, total);
    }
    // The rest of the larger image must read as zeroes.
    let (big, name) = if sa > sb { (&ia, pa) } else { (&ib, pb) };
    while pos < total {
        let n = (total - pos).min(CHUNK as u64) as usize;
        read_at(&**big, pos, &mut ba[..n]).map_err(err)?;
        if let Some(i) = ba[..n].iter().position(|&x| x != 0) {
            progress.finish();
            println!(
                "Content mismatch at offset {}! ({name} is larger and not zero there)",
                pos + i as u64
            );
            return Ok(1);
        }
        pos += n as u64;
        progress.update(pos, total);
    }
    progress.finish();
    if sa != sb {
        println!("Warning: Image size mismatch!");
    }
    println!("Images are identical.");
    Ok(0)
}

// ------------------------------------------------------------------ bench

/// A heap buffer aligned to 4 KiB (for cache=none).
fn aligned_buf(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + 4096];
    let off = v.as_ptr().align_offset(4096);
    (v, off)
}

fn cmd_bench(args: &[String]) -> Res<u8> {
    let a = Args::parse(
        args,
        &[
            "-c",
            "-d",
            "-f",
            "-o",
            "-s",
            "-S",
            "-t",
            "-i",
            "--pattern",
            "--flush-interval",
        ],
        &["-w", "-q", "-n", "--no-drain", "--random", "-U"],
    )?;
    let [file] = a.pos.as_slice() else {
        return Err("bench needs exactly one FILE".into());
    };
    let count = a.num("-c", 75000)?;
    let depth = a.num("-d", 64)?.clamp(1, 1024);
    let size = a.num("-s", 4096)?.max(1);
    // As in qemu-img, a step of 0 means the request size.
    let step = match a.num("-S", 0)? {
        0 => size,
        s => s,
    };
    let start = a.num("-o", 0)?;
    let write = a.flag("-w");
    let random = a.flag("--random");
    let pattern = a.num("--pattern", 0)? as u8;
    let flush_interval = a.num("--flush-interval", 0)?;
    let cache: CacheMode = a.get("-t").unwrap_or("writeback").parse().map_err(err)?;
    let img = open(file, a.get("-f"), !write, cache)?;
    let image_size = img.virtual_size();
    if size > image_size {
        return Err(format!(
            "request size {size} exceeds the image size {image_size}"
        ));
    }
    if !a.flag("-q") {
        println!(
            "Sending {count} {} requests, {size} bytes each, {depth} in parallel (starting at offset {start}, step size {}{})",
            if write { "write" } else { "read" },
            step,
            if random { ", random offsets" } else { "" }
        );
    }
    let next = AtomicU64::new(0);
    let t0 = Instant::now();
    let failed: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    let slots = image_size / size;
    std::thread::scope(|s| {
        for t in 0..depth {
            let img = img.clone();
            let next = &next;
            let failed = &failed;
            s.spawn(move || {
                let (mut v, off) = aligned_buf(size as usize);
                let buf = &mut v[off..off + size as usize];
                buf.fill(pattern);
                // One slice for every request: no per-request allocation or copy.
                let slice = [VolatileSlice::from(buf)];
                let mut rng =
                    0x2545_f491_4f6c_dd1du64 ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let offset = if random {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        (rng % slots) * size
                    } else {
                        let o = start.wrapping_add(i.wrapping_mul(step)) % image_size;
                        if o + size > image_size {
                            0
                        } else {
                            o
                        }
                    };
                    let r = if write {
                        img.write_vectored(offset, &slice)
                    } else {
                        img.read_vectored(offset, &slice)
                    };
                    let r = r.and_then(|_| {
                        if write && flush_interval > 0 && (i + 1) % flush_interval == 0 {
                            img.flush()
                        } else {
                            Ok(())
                        }
                    });
                    if let Err(e) = r {
                        let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                        f.get_or_insert(e.to_string());
                        next.store(count, Ordering::Relaxed);
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if write {
        img.flush().map_err(err)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!("Run completed in {secs:.3} seconds.");
    if !a.flag("-q") && secs > 0.0 {
        println!(
            "{:.0} requests/s, {:.2} MiB/s",
            count as f64 / secs,
            (count * size) as f64 / secs / (1 << 20) as f64
        );
    }
    Ok(0)
}
