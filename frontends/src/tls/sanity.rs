//! qemu's load-time checks of x509 credentials (`sanity-check=on`, the default), with its
//! messages: CA certificates must be CAs allowed to sign, our own certificate must not be a
//! CA, must be in its validity period, must allow its use where the extension is critical,
//! and must be signed by one of the CAs.

use super::TlsError;
use std::path::Path;
use x509_parser::certificate::X509Certificate;
use x509_parser::time::ASN1Time;

fn err(msg: String) -> TlsError {
    TlsError::Creds(msg)
}

fn times(c: &X509Certificate, file: &str, role: &str) -> Result<(), TlsError> {
    let now = ASN1Time::now();
    if c.validity().not_after < now {
        return Err(err(format!("The {role} certificate {file} has expired")));
    }
    if c.validity().not_before > now {
        return Err(err(format!(
            "The {role} certificate {file} is not yet active"
        )));
    }
    Ok(())
}

fn check_ca(c: &X509Certificate, file: &str) -> Result<(), TlsError> {
    times(c, file, "CA")?;
    match c.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(Some(_)) => {
            return Err(err(format!(
                "The certificate {file} basic constraints do not show a CA"
            )))
        }
        Ok(None) => {
            return Err(err(format!(
                "The certificate {file} is missing basic constraints for a CA"
            )))
        }
        Err(e) => {
            return Err(err(format!(
                "Unable to query certificate {file} basic constraints: {e}"
            )))
        }
    }
    if let Ok(Some(ku)) = c.key_usage() {
        if ku.critical && !ku.value.key_cert_sign() {
            return Err(err(format!(
                "Certificate {file} usage does not permit certificate signing"
            )));
        }
    }
    Ok(())
}

fn check_own(c: &X509Certificate, file: &str, server: bool) -> Result<(), TlsError> {
    let role = if server { "server" } else { "client" };
    times(c, file, role)?;
    if let Ok(Some(bc)) = c.basic_constraints() {
        if bc.value.ca {
            return Err(err(format!(
                "The certificate {file} basic constraints show a CA, but we need one for a {role}"
            )));
        }
    }
    if let Ok(Some(ku)) = c.key_usage() {
        if ku.critical && !ku.value.digital_signature() {
            return Err(err(format!(
                "Certificate {file} usage does not permit digital signature"
            )));
        }
        if ku.critical && !ku.value.key_encipherment() {
            return Err(err(format!(
                "Certificate {file} usage does not permit key encipherment"
            )));
        }
    }
    if let Ok(Some(eku)) = c.extended_key_usage() {
        let v = eku.value;
        let allowed =
            v.any || !v.other.is_empty() || if server { v.server_auth } else { v.client_auth };
        if eku.critical && !allowed {
            return Err(err(format!(
                "Certificate {file} purpose does not allow use with a TLS {role}"
            )));
        }
    }
    Ok(())
}

/// Check the CA list and our own certificate (the first of `own`) as qemu does at load.
pub fn check(
    ca_file: &Path,
    ca_der: &[Vec<u8>],
    own_file: Option<&Path>,
    own_chain: &[Vec<u8>],
    server: bool,
) -> Result<(), TlsError> {
    let ca_name = ca_file.display().to_string();
    let mut cas = Vec::new();
    for der in ca_der {
        let (_, c) = x509_parser::parse_x509_certificate(der)
            .map_err(|_| err(format!("Unable to import CA certificate list {ca_name}")))?;
        check_ca(&c, &ca_name)?;
        cas.push(c);
    }
    let (Some(file), Some(der)) = (own_file, own_chain.first()) else {
        return Ok(());
    };
    let own_name = file.display().to_string();
    let (_, c) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| err(format!("Unable to import certificate {own_name}: {e}")))?;
    check_own(&c, &own_name, server)?;
    // With intermediates in the file the chain is the handshake's to check.
    let signed = own_chain.len() > 1
        || cas.iter().any(|ca| {
            ca.subject() == c.issuer() && c.verify_signature(Some(ca.public_key())).is_ok()
        });
    if !signed {
        return Err(err(format!(
            "Our own certificate {own_name} failed validation against {ca_name}: The certificate hasn't got a known issuer"
        )));
    }
    Ok(())
}
