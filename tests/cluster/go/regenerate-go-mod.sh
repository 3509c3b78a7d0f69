#!/usr/bin/env bash
# Regenerate go.mod for another Kubernetes release: ./regenerate-go-mod.sh v1.36.3 v3.6.8
# Every staging module that upstream's go.mod requires at v0.0.0 (it replaces them with
# its own staging/ folders, which Go ignores for dependencies) is pinned to v0.<minor>.<patch>.
set -euo pipefail
cd "$(dirname "$0")"
k8s="${1:?kubernetes version, e.g. v1.36.3}"
etcd="${2:?etcd server version required by k8s.io/apiserver, e.g. v3.6.8}"
staging="v0.${k8s#v1.}"
upstream="$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@${k8s}" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')"
{
  echo "module ascend.test/testcluster"
  echo
  grep -E '^go [0-9]' "$upstream"
  echo
  grep -E '^godebug ' "$upstream" || true
  echo
  echo "require ("
  echo "	k8s.io/kubernetes ${k8s}"
  echo "	go.etcd.io/etcd/server/v3 ${etcd}"
  echo ")"
  echo
  echo "replace ("
  grep -E '^\s+k8s\.io/[^ ]+ v0\.0\.0$' "$upstream" | awk -v v="$staging" '{print "\t"$1" => "$1" "v}'
  echo ")"
} > go.mod
GOTOOLCHAIN=local GOFLAGS=-mod=mod go mod tidy
