// Command fakeupstream is the streaming fake OpenAI upstream used by the
// kubellm benchmark (bench/run.py).
//
// POST /v1/chat/completions with "stream": true answers with OpenAI-style
// server-sent events: a role chunk, -chunks content chunks, a finish chunk,
// a usage chunk (only when "stream_options": {"include_usage": true}) and
// "data: [DONE]". Every event is flushed on its own, like a real upstream.
// Without "stream": true it answers the fixed non-streamed chat.completion
// JSON (the benchmark uses nginx for that, this is only a fallback).
// GET /health answers 200 "ok".
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"time"
)

const (
	completionID = "chatcmpl-bench0000000000000000000001"
	modelName    = "gpt-4o-mini-2024-07-18"
	created      = 1700000000
	promptTokens = 23
)

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

type chatRequest struct {
	Stream        bool           `json:"stream"`
	StreamOptions *streamOptions `json:"stream_options"`
}

type server struct {
	roleEvent   []byte
	tokenEvents [][]byte
	finishEvent []byte
	usageEvent  []byte
	doneEvent   []byte
	jsonBody    []byte
	delay       time.Duration
}

func sse(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return []byte("data: " + string(b) + "\n\n")
}

type promptDetails struct {
	CachedTokens int `json:"cached_tokens"`
	AudioTokens  int `json:"audio_tokens"`
}

type completionDetails struct {
	ReasoningTokens          int `json:"reasoning_tokens"`
	AudioTokens              int `json:"audio_tokens"`
	AcceptedPredictionTokens int `json:"accepted_prediction_tokens"`
	RejectedPredictionTokens int `json:"rejected_prediction_tokens"`
}

type usageBlock struct {
	PromptTokens            int               `json:"prompt_tokens"`
	CompletionTokens        int               `json:"completion_tokens"`
	TotalTokens             int               `json:"total_tokens"`
	PromptTokensDetails     promptDetails     `json:"prompt_tokens_details"`
	CompletionTokensDetails completionDetails `json:"completion_tokens_details"`
}

type delta struct {
	Role    string  `json:"role,omitempty"`
	Content *string `json:"content,omitempty"`
	Refusal *string `json:"refusal,omitempty"`
}

type chunkChoice struct {
	Index        int     `json:"index"`
	Delta        delta   `json:"delta"`
	Logprobs     *string `json:"logprobs"`
	FinishReason *string `json:"finish_reason"`
}

type chunkBody struct {
	ID                string        `json:"id"`
	Object            string        `json:"object"`
	Created           int           `json:"created"`
	Model             string        `json:"model"`
	ServiceTier       string        `json:"service_tier"`
	SystemFingerprint string        `json:"system_fingerprint"`
	Choices           []chunkChoice `json:"choices"`
	Usage             *usageBlock   `json:"usage,omitempty"`
}

type message struct {
	Role    string  `json:"role"`
	Content string  `json:"content"`
	Refusal *string `json:"refusal"`
}

type choice struct {
	Index        int     `json:"index"`
	Message      message `json:"message"`
	Logprobs     *string `json:"logprobs"`
	FinishReason string  `json:"finish_reason"`
}

type completionBody struct {
	ID                string     `json:"id"`
	Object            string     `json:"object"`
	Created           int        `json:"created"`
	Model             string     `json:"model"`
	Choices           []choice   `json:"choices"`
	Usage             usageBlock `json:"usage"`
	ServiceTier       string     `json:"service_tier"`
	SystemFingerprint string     `json:"system_fingerprint"`
}

func chunk(d delta, finish *string) chunkBody {
	return chunkBody{
		ID: completionID, Object: "chat.completion.chunk", Created: created, Model: modelName,
		ServiceTier: "default", SystemFingerprint: "fp_bench",
		Choices: []chunkChoice{{Index: 0, Delta: d, FinishReason: finish}},
	}
}

func usage(completionTokens int) usageBlock {
	return usageBlock{
		PromptTokens:     promptTokens,
		CompletionTokens: completionTokens,
		TotalTokens:      promptTokens + completionTokens,
	}
}

var words = strings.Fields("Hello ! I am a fake upstream model that streams a fixed answer " +
	"so the router benchmark measures only proxy overhead and nothing else at all .")

func newServer(chunks int, delay time.Duration) *server {
	s := &server{delay: delay, doneEvent: []byte("data: [DONE]\n\n")}
	empty := ""
	s.roleEvent = sse(chunk(delta{Role: "assistant", Content: &empty}, nil))
	var text strings.Builder
	for i := 0; i < chunks; i++ {
		tok := words[i%len(words)]
		if i > 0 {
			tok = " " + tok
		}
		text.WriteString(tok)
		s.tokenEvents = append(s.tokenEvents, sse(chunk(delta{Content: &tok}, nil)))
	}
	stop := "stop"
	s.finishEvent = sse(chunk(delta{}, &stop))
	u := chunk(delta{}, nil)
	u.Choices = []chunkChoice{}
	ub := usage(chunks)
	u.Usage = &ub
	s.usageEvent = sse(u)
	body, err := json.Marshal(completionBody{
		ID: completionID, Object: "chat.completion", Created: created, Model: modelName,
		Choices: []choice{{
			Index:        0,
			Message:      message{Role: "assistant", Content: text.String()},
			FinishReason: "stop",
		}},
		Usage:             usage(chunks),
		ServiceTier:       "default",
		SystemFingerprint: "fp_bench",
	})
	if err != nil {
		panic(err)
	}
	s.jsonBody = body
	return s
}

func (s *server) chat(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	raw, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		http.Error(w, "bad body", http.StatusBadRequest)
		return
	}
	var req chatRequest
	if err := json.Unmarshal(raw, &req); err != nil {
		http.Error(w, `{"error":{"message":"invalid JSON body","type":"invalid_request_error"}}`, http.StatusBadRequest)
		return
	}
	h := w.Header()
	if !req.Stream {
		h.Set("Content-Type", "application/json")
		h.Set("Content-Length", fmt.Sprint(len(s.jsonBody)))
		_, _ = w.Write(s.jsonBody)
		return
	}
	h.Set("Content-Type", "text/event-stream; charset=utf-8")
	h.Set("Cache-Control", "no-cache")
	flusher, _ := w.(http.Flusher)
	send := func(b []byte) bool {
		if _, err := w.Write(b); err != nil {
			return false
		}
		if flusher != nil {
			flusher.Flush()
		}
		return true
	}
	if !send(s.roleEvent) {
		return
	}
	for _, ev := range s.tokenEvents {
		if s.delay > 0 {
			time.Sleep(s.delay)
		}
		if !send(ev) {
			return
		}
	}
	if !send(s.finishEvent) {
		return
	}
	if req.StreamOptions != nil && req.StreamOptions.IncludeUsage {
		if !send(s.usageEvent) {
			return
		}
	}
	send(s.doneEvent)
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	chunks := flag.Int("chunks", 20, "content chunks per streamed response")
	delay := flag.Duration("delay", 0, "sleep before each content chunk (e.g. 5ms)")
	printJSON := flag.Bool("print-json", false, "print the non-streamed chat.completion body and exit")
	flag.Parse()

	s := newServer(*chunks, *delay)
	if *printJSON {
		fmt.Println(string(s.jsonBody))
		return
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/chat/completions", s.chat)
	mux.HandleFunc("/chat/completions", s.chat)
	mux.HandleFunc("/health", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok"))
	})
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("fakeupstream listening on http://%s (chunks=%d delay=%s)", ln.Addr(), *chunks, *delay)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 10 * time.Minute}
	log.Fatal(srv.Serve(ln))
}
