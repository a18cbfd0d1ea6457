// Package scheduler is the REAPI Execution service of the farm, its state
// replicated with hashicorp/raft so that losing a node loses no
// operation.
//
// A Node is one raft replica whose FSM is a state.State. Execution serves
// REAPI Execution and google.longrunning Operations, Workers serves the
// worker protocol (proto/tvixfarm/worker/v1) and does the leader's
// housekeeping, Cluster serves farmctl, and Forwarder lets any node
// accept any call by proxying it to the leader. See ARCHITECTURE.md.
package scheduler
