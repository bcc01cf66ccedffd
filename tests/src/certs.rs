//! Test certificates, made with the `openssl` CLI at test time: private CAs and certificates
//! signed by them, for the TLS tests of PostgreSQL and the brokers.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs `openssl` with `args` in `dir`; fails with its error output.
pub fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("running openssl (the CLI is needed to generate test certificates)")?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `openssl req <kind>` with a new unencrypted EC P-256 key written to `key`, the request or
/// certificate written to `out`, for `subject`, plus `extra` arguments.
fn request_with_new_key(
    dir: &Path,
    kind: &str,
    [key, out, subject]: [&str; 3],
    extra: &[&str],
) -> Result<()> {
    let mut args = vec![
        "req",
        kind,
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        key,
        "-out",
        out,
        "-subj",
        subject,
    ];
    args.extend_from_slice(extra);
    openssl(dir, &args)
}

/// A CA (`<name>-ca.crt`/`.key`) with an EC P-256 key.
pub fn make_ca(dir: &Path, name: &str) -> Result<()> {
    request_with_new_key(
        dir,
        "-x509",
        [
            &format!("{name}-ca.key"),
            &format!("{name}-ca.crt"),
            &format!("/CN=outbox test {name} CA"),
        ],
        &[
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )
}

/// A certificate `<name>.crt` (key `<name>.key`, PKCS#8) for `cn`, signed by the `ca` CA.
pub fn make_cert(dir: &Path, ca: &str, name: &str, cn: &str, ext: &str) -> Result<()> {
    request_with_new_key(
        dir,
        "-new",
        [
            &format!("{name}.key"),
            &format!("{name}.csr"),
            &format!("/CN={cn}"),
        ],
        &[],
    )?;
    std::fs::write(dir.join(format!("{name}.ext")), ext)?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}-ca.crt"),
            "-CAkey",
            &format!("{ca}-ca.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    )
}
