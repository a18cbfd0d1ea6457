// Package frontend will turn Nix derivations (.drv files, Tvix/Snix
// BuildRequests) into REAPI actions, drive whole derivation graphs, and
// serve the Tvix/Snix store and build protocols and a Nix binary cache.
// It is built in the Frontend and Tvix/Snix front door issues; today the
// farm serves storage only (see ARCHITECTURE.md).
package frontend
