package coordinator

import (
	"crypto/rand"
	"encoding/hex"
	"time"
)

// EventKind says what happened.
type EventKind int

const (
	// Uploaded: local sources were uploaded (Paths of them).
	Uploaded EventKind = iota
	// Queued: a derivation is ready and waits for a slot.
	Queued
	// Started: its action was submitted to the farm.
	Started
	// Executing: the farm runs it.
	Executing
	// Built: it was built (Cached: its action was in the action cache).
	Built
	// Failed: it failed (Err says why).
	Failed
)

// Event is a step of a build, for progress displays.
type Event struct {
	Kind EventKind
	// Drv is the derivation's path, Name its name.
	Drv, Name string
	// Worker that ran it (Built), if known.
	Worker string
	// Cached is set on Built when the action cache had the result.
	Cached bool
	// Took is the time from submission to the result (Built, Failed).
	Took time.Duration
	// Paths is the number of paths (Uploaded).
	Paths int
	Err   error
	// Counts after the event.
	Counts Counts
}

// Counts of a build's derivations.
type Counts struct {
	// Total derivations to build; Present: wanted and already on the farm.
	Total, Present int
	// Running: submitted, not finished. Built includes Cached.
	Running, Built, Cached, Failed, Skipped int
	// Uploaded local sources.
	Uploaded int
}

func newID() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
