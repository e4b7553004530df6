#!/usr/bin/env bash
# Development certificates for TLS with mutual authentication (silo <-> silo, client <-> gateway), made with
# openssl. Not for production: the CA key lies unencrypted beside the certificates.
#
#   deploy/local/make-dev-certs.sh [DIR]     (default deploy/local/state/certs)
#
# Writes PEM files into DIR:
#   ca.pem, ca.key          the development CA (the only trust anchor silos and clients are given: --tls-ca)
#   silo.pem, silo.key      every silo's certificate: serverAuth and clientAuth (a silo accepts and dials other
#                           silos), SANs: the DNS name BACKPROP_CERT_NAME (default backprop-silo: what
#                           --tls-peer-name checks where addresses change, as pod IPs do), localhost and
#                           127.0.0.1 .. 127.0.0.N (N = BACKPROP_CERT_HOSTS, default 16: the addresses dialled locally)
#   client.pem, client.key  a CLI's certificate: clientAuth only (silos refuse it on their silo port)
# Files already there are kept (delete DIR to start again); the CA is made once, so certificates made later
# with the same DIR are still accepted by the same cluster.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${1:-$ROOT/deploy/local/state/certs}
HOSTS=${BACKPROP_CERT_HOSTS:-16}
NAME=${BACKPROP_CERT_NAME:-backprop-silo}
DAYS=${BACKPROP_CERT_DAYS:-825}
[[ $HOSTS =~ ^[1-9][0-9]*$ && $HOSTS -le 254 ]] || { echo "error: BACKPROP_CERT_HOSTS must be in 1..254" >&2; exit 2; }
[[ $NAME =~ ^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?$ ]] || { echo "error: BACKPROP_CERT_NAME must be a DNS name" >&2; exit 2; }
command -v openssl >/dev/null || { echo "error: openssl is not installed (apt-get install -y openssl)" >&2; exit 2; }
mkdir -p "$DIR"
cd "$DIR"
umask 077

# ECDSA P-256: small and fast handshakes; .NET, openssl and Orleans all take it.
key() { [ -f "$1" ] || openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ ! -f ca.pem ]; then
  key ca.key
  openssl req -x509 -new -key ca.key -sha256 -days "$DAYS" -subj "/CN=Backprop development CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.pem 2>/dev/null
  echo "made $DIR/ca.pem (CA)"
fi

# issue NAME CN EKU SAN: a certificate signed by the CA.
issue() {
  local name=$1 cn=$2 eku=$3 san=$4
  [ -f "$name.pem" ] && return 0
  key "$name.key"
  local ext
  ext=$(mktemp)
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyAgreement"
    echo "extendedKeyUsage=$eku"
    [ -n "$san" ] && echo "subjectAltName=$san"
  } > "$ext"
  openssl req -new -key "$name.key" -subj "/CN=$cn" 2>/dev/null \
    | openssl x509 -req -CA ca.pem -CAkey ca.key -CAcreateserial -days "$DAYS" -sha256 -extfile "$ext" -out "$name.pem" 2>/dev/null
  rm -f "$ext"
  echo "made $DIR/$name.pem ($cn)"
}

sans="DNS:$NAME,DNS:localhost"
for ((i = 1; i <= HOSTS; i++)); do sans+=",IP:127.0.0.$i"; done
issue silo "backprop silo" "serverAuth,clientAuth" "$sans"
issue client "backprop client" "clientAuth" ""
rm -f ca.srl
# Certificates are public; keys stay readable by this user only.
chmod 644 ca.pem silo.pem client.pem
echo "certificates in $DIR: silos --tls-cert silo.pem --tls-key silo.key --tls-ca ca.pem; CLI --tls-cert client.pem --tls-key client.key --tls-ca ca.pem"
