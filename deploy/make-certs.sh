#!/usr/bin/env bash
# Make the keys and certificates a fedsynth consortium needs.
#
#   deploy/make-certs.sh --out DIR --host NAME_OR_IP [--host ...] [--hospital NAME ...] [--days N]
#
# Writes, under DIR:
#   ca.key, ca.crt              the consortium's certificate authority (keep ca.key offline;
#                               give ca.crt to every hospital)
#   server.key, server.pem      the SuperLink's TLS key and certificate, valid for every --host
#                               and for localhost / 127.0.0.1 (the coordinator's own tools)
#   hospitals/NAME.key(.pub)    an ECDSA P-384 key pair per --hospital, for SuperNode
#                               authentication. In a real consortium each hospital makes its
#                               own and sends only the .pub:
#                                 ssh-keygen -t ecdsa -b 384 -N "" -f hospital.key
#
# Needs openssl and ssh-keygen. Existing files are kept, never overwritten.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

out="" ; days=825 ; hosts=() ; hospitals=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --host) hosts+=("$2"); shift 2 ;;
    --hospital) hospitals+=("$2"); shift 2 ;;
    --days) days="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "make-certs.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$out" ]] || { echo "make-certs.sh: --out DIR is required (see --help)" >&2; exit 2; }
hosts+=(localhost 127.0.0.1)  # the coordinator's own tools (fedsynth run, register-hospital) connect locally
for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "make-certs.sh: '$tool' not found; install it (Debian: apt install openssl openssh-client)" >&2; exit 2; }
done

mkdir -p "$out/hospitals"
umask 077

san=""
for h in $(printf '%s\n' "${hosts[@]}" | awk '!seen[$0]++'); do
  if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san+="IP:$h,"; else san+="DNS:$h,"; fi
done
san="${san%,}"

if [[ -e "$out/ca.key" ]]; then
  echo "keeping the existing CA in $out (ca.key, ca.crt)"
else
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -days "$days" \
    -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=fedsynth consortium CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  echo "made the consortium CA: $out/ca.crt (keep $out/ca.key offline)"
fi

if [[ -e "$out/server.pem" ]]; then
  echo "keeping the existing SuperLink certificate $out/server.pem"
else
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes \
    -keyout "$out/server.key" -out "$out/server.csr" -subj "/CN=${hosts[0]}" 2>/dev/null
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyAgreement\nextendedKeyUsage=serverAuth\n' "$san" > "$out/server.ext"
  openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -days "$days" -sha384 -extfile "$out/server.ext" -out "$out/server.pem" 2>/dev/null
  rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
  echo "made the SuperLink certificate: $out/server.pem for $san"
fi

for name in "${hospitals[@]}"; do
  [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "make-certs.sh: hospital name '$name' may use only letters, digits, '.', '_' and '-'" >&2; exit 2; }
  key="$out/hospitals/$name.key"
  if [[ -e "$key" ]]; then
    echo "keeping the existing key of $name: $key"
  else
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedsynth-$name" -f "$key"
    echo "made the key pair of $name: $key (private, stays at the hospital) and $key.pub"
  fi
done
chmod 644 "$out/ca.crt" "$out/server.pem" "$out"/hospitals/*.pub 2>/dev/null || true
