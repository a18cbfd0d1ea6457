// Package executor will run REAPI actions in OCI sandboxes (runc's
// libcontainer) that give a Nix builder exactly the environment of Nix's
// own sandbox. It is built in the Executor issue; today the farm serves
// storage only (see ARCHITECTURE.md).
package executor
