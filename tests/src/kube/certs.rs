//! A throwaway CA, the API server's serving certificate, and its service-account key.
use std::net::{IpAddr, Ipv4Addr};

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

pub struct Certs {
    pub ca_pem: String,
    pub server_pem: String,
    pub server_key_pem: String,
    /// Signs service-account tokens (the server requires one even if no test uses them).
    pub sa_key_pem: String,
    pub sa_public_pem: String,
}

pub fn generate() -> Result<Certs> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "sluice test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;

    let mut server = CertificateParams::new(vec!["localhost".to_string()])?;
    server
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    server
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate()?;
    let server_cert = server.signed_by(&server_key, &ca)?;

    let sa = KeyPair::generate()?;
    Ok(Certs {
        ca_pem: ca.pem(),
        server_pem: server_cert.pem(),
        server_key_pem: server_key.serialize_pem(),
        sa_key_pem: sa.serialize_pem(),
        sa_public_pem: sa.public_key_pem(),
    })
}
