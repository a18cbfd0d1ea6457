// Package e2e holds the end-to-end tests of the frontend: the corpus of
// frontend/testdata/nix built by real Nix (nix-build, sandbox on) and by
// an embedded farm with real runc sandboxes, compared bit for bit.
package e2e
