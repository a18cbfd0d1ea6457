// Package scheduler will be the REAPI Execution service, its state
// replicated with hashicorp/raft. It is built in the Scheduler issue; today
// the farm serves storage only (see ARCHITECTURE.md).
package scheduler
