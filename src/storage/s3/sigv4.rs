//! AWS Signature Version 4 in the `Authorization` header (S3 service), without I/O. Stores that
//! check credentials on header-signed requests but not on presigned URLs (moto, some gateways)
//! then refuse wrong ones as S3 does.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// The payload hash S3 accepts when the body is not hashed (it is checked by TCP and TLS).
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// What to sign: the request line and the headers that go with it.
#[derive(Debug)]
pub struct Request<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Host header value (`host` or `host:port`).
    pub host: &'a str,
    /// Path, already URI-encoded as sent.
    pub path: &'a str,
    /// Query parameters, already URI-encoded as sent (any order).
    pub query: Vec<(String, String)>,
    /// Headers to sign besides host, x-amz-date and x-amz-content-sha256 (lowercase names).
    pub headers: Vec<(String, String)>,
    /// Hex SHA-256 of the body, or [`UNSIGNED_PAYLOAD`].
    pub payload_hash: &'a str,
    /// Time of the request, `YYYYMMDDTHHMMSSZ`.
    pub amz_date: &'a str,
}

/// Credentials and scope.
#[derive(Debug)]
pub struct Signer<'a> {
    /// Access key id.
    pub key_id: &'a str,
    /// Secret access key.
    pub secret: &'a str,
    /// Region name.
    pub region: &'a str,
}

impl Signer<'_> {
    /// The `Authorization` header value for `req`.
    pub fn authorization(&self, req: &Request<'_>) -> String {
        let mut headers: Vec<(String, String)> = req
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        headers.push(("host".into(), req.host.to_string()));
        headers.push(("x-amz-content-sha256".into(), req.payload_hash.to_string()));
        headers.push(("x-amz-date".into(), req.amz_date.to_string()));
        headers.sort();
        let signed: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
        let signed = signed.join(";");
        let mut query = req.query.clone();
        query.sort();
        let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
        let canonical = format!(
            "{}\n{}\n{}\n{canonical_headers}\n{signed}\n{}",
            req.method,
            req.path,
            query.join("&"),
            req.payload_hash
        );
        let date = &req.amz_date[..8.min(req.amz_date.len())];
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
            req.amz_date,
            sha256_hex(canonical.as_bytes())
        );
        let mut key = hmac(format!("AWS4{}", self.secret).as_bytes(), date.as_bytes());
        for part in [self.region, "s3", "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        let signature = hex(&hmac(&key, to_sign.as_bytes()));
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
            self.key_id
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's documented example: GET Object with a Range header.
    #[test]
    fn matches_the_aws_get_object_example() {
        let signer = Signer {
            key_id: "AKIAIOSFODNN7EXAMPLE",
            secret: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            region: "us-east-1",
        };
        let empty = sha256_hex(b"");
        let auth = signer.authorization(&Request {
            method: "GET",
            host: "examplebucket.s3.amazonaws.com",
            path: "/test.txt",
            query: Vec::new(),
            headers: vec![("range".into(), "bytes=0-9".into())],
            payload_hash: &empty,
            amz_date: "20130524T000000Z",
        });
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }
}
