// SPDX-License-Identifier: Apache-2.0 OR MIT
//! `vmkit-img`: a small qemu-img work-alike built on `vmkit-block`.
//!
//! ```text
//! cargo run --release --example vmkit-img -- info [--output json] [-f fmt] FILE
//! cargo run --release --example vmkit-img -- check [--repair] [--output json] FILE
//! cargo run --release --example vmkit-img -- convert [-f fmt] -O raw|qcow2|vpc|vhdx [-o opts] [-p] SRC DST
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
use vmkit::block::vpc::{VpcBackend, VpcCreateOptions, VpcSubformat};
use vmkit::block::{
    open_image, probe_path, read_at, write_at, BlockBackend, BlockError, CacheMode, ImageFormat,
    OpenOptions,
};

type Res<T> = Result<T, String>;

const USAGE: &str = "usage: vmkit-img <command> [options]
commands:
  info [--output human|json] [-f fmt] FILE
  check [--repair] [--output human|json] [-f fmt] FILE
  convert [-f fmt] -O raw|qcow2|vpc|vhdx [-o opts] [-p|-q] SRC DST
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

/// Copies every non-zero byte of `src` into `dst` (whose unwritten areas read as zeroes).
fn copy_data(src: &dyn BlockBackend, dst: &dyn BlockBackend, progress: &mut Progress) -> Res<()> {
    const CHUNK: u64 = 2 << 20;
    let size = src.virtual_size();
    if dst.virtual_size() < size {
        return Err(format!(
            "the destination ({} bytes) is smaller than the source ({size} bytes)",
            dst.virtual_size()
        ));
    }
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    while pos < size {
        let st = src
            .block_status(pos, (size - pos).min(1 << 30))
            .map_err(err)?;
        let n = st.len.max(1).min(size - pos);
        if st.zero {
            pos += n;
            progress.update(pos, size);
            continue;
        }
        let mut done = 0;
        while done < n {
            let k = (n - done).min(CHUNK);
            let b = &mut buf[..k as usize];
            read_at(src, pos + done, b).map_err(err)?;
            if b.iter().any(|&x| x != 0) {
                write_at(dst, pos + done, b).map_err(err)?;
            }
            done += k;
            progress.update(pos + done, size);
        }
        pos += n;
    }
    dst.flush().map_err(err)
}

fn cmd_convert(args: &[String]) -> Res<u8> {
    let a = Args::parse(
        args,
        &["-f", "-O", "-o", "-t", "-T"],
        &["-p", "-q", "-U", "-n"],
    )?;
    let [src_path, dst_path] = a.pos.as_slice() else {
        return Err("convert needs SRC and DST".into());
    };
    let out_fmt = static_fmt(a.get("-O").unwrap_or("raw"))?;
    let src = open(src_path, a.get("-f"), true, CacheMode::Writeback)?;
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
    create_image(out_fmt, dst_p, Some(src.virtual_size()), &kv, None)?;
    let cache: CacheMode = a.get("-t").unwrap_or("writeback").parse().map_err(err)?;
    let dst = open(dst_path, Some(out_fmt), false, cache)?;
    let show = a.flag("-p") || (!a.flag("-q") && std::io::stderr().is_terminal());
    let mut progress = Progress::new(show);
    copy_data(&*src, &*dst, &mut progress)?;
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
    let step = a.num("-S", size)?;
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
                        write_at(&*img, offset, buf)
                    } else {
                        read_at(&*img, offset, buf)
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
