#!/usr/bin/env bash
# Test certificates for postcopyd's TLS: a CA, postcopyd's server
# certificate and the agent's client certificate, with openssl. For tests,
# demos and trying things out; production certificates come from your own CA.
#
#   scripts/make-test-certs.sh DIR            ca, daemon, agent
#   scripts/make-test-certs.sh DIR --refused  also certificates postcopyd must
#                                             refuse: signed by another CA,
#                                             expired, naming another client
#
# postcopyd:     --tls-ca DIR/ca.pem --tls-cert DIR/daemon.pem --tls-key DIR/daemon.key
#                --tls-client-name postcopy-agent
# postcopy-push: --tls-ca DIR/ca.pem --tls-cert DIR/agent.pem --tls-key DIR/agent.key
#                (postcopyd's certificate names 127.0.0.1, ::1 and postcopyd)
set -euo pipefail

dir=${1:?usage: make-test-certs.sh DIR [--refused]}
refused=${2:-}
mkdir -p "$dir"
cd "$dir"
umask 077

key() {  # name: a P-256 private key
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null
}

ca() {  # name, subject: a self-signed CA certificate
    key "$1"
    openssl req -x509 -new -key "$1.key" -out "$1.pem" -days 3650 -subj "$2" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
}

leaf() {  # name, signing CA, subject, subjectAltName, usage, days
    key "$1"
    openssl req -new -key "$1.key" -out "$1.csr" -subj "$3"
    printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\n' "$4" "$5" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -days "$6" \
        -extfile "$1.ext" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

ca ca "/O=postcopyd test/CN=postcopyd test CA"
leaf daemon ca "/O=postcopyd test/CN=postcopyd" "DNS:postcopyd,IP:127.0.0.1,IP:::1" serverAuth 825
leaf agent ca "/O=postcopyd test/CN=postcopy-agent" "DNS:postcopy-agent" clientAuth 825

if [[ $refused == --refused ]]; then
    # The right name, but signed by a CA postcopyd does not trust.
    ca other-ca "/O=somebody else/CN=another CA"
    leaf stranger-agent other-ca "/O=somebody else/CN=postcopy-agent" "DNS:postcopy-agent" clientAuth 825
    # The right CA and name, but expired yesterday.
    leaf expired-agent ca "/O=postcopyd test/CN=postcopy-agent" "DNS:postcopy-agent" clientAuth -1
    # The right CA, but another client's name.
    leaf other-agent ca "/O=postcopyd test/CN=other-client" "DNS:other-client" clientAuth 825
    # A daemon certificate from the untrusted CA, for the agent to refuse.
    leaf stranger-daemon other-ca "/O=somebody else/CN=postcopyd" "DNS:postcopyd,IP:127.0.0.1,IP:::1" serverAuth 825
fi
chmod 0644 ./*.pem
echo "test certificates in $dir"
