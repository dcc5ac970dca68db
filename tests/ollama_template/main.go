// Renders an Ollama TEMPLATE with Go's own text/template, the way Ollama's /api/chat does.
//
// It reads one JSON object on stdin,
//
//	{"template": "...", "system": "the Modelfile SYSTEM, or empty",
//	 "messages": [{"role": "user", "content": "..."}], "tools": []}
//
// stdout: the prompt text Ollama would send to the model.
//
// Mirrors ollama/server/routes.go (the Modelfile SYSTEM becomes a first system message when
// the request has none) and ollama/template/template.go: Parse with missingkey=zero and the
// "json" function, collate (system messages joined into .System, consecutive messages of one
// role merged with "\n\n"), and the data map of the .Messages path. Standard library only.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

// The fields of ollama/api.Message and api.Tool that templates read.
type ToolCallFunction struct {
	Index     int            `json:"index,omitempty"`
	Name      string         `json:"name"`
	Arguments map[string]any `json:"arguments"`
}

type ToolCall struct {
	Function ToolCallFunction `json:"function"`
}

type Message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	Thinking  string     `json:"thinking,omitempty"`
	Images    []string   `json:"images,omitempty"`
	ToolCalls []ToolCall `json:"tool_calls,omitempty"`
	ToolName  string     `json:"tool_name,omitempty"`
}

type ToolFunction struct {
	Name        string         `json:"name"`
	Description string         `json:"description"`
	Parameters  map[string]any `json:"parameters"`
}

type Tool struct {
	Type     string       `json:"type"`
	Function ToolFunction `json:"function"`
}

type Request struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
	Tools    []Tool    `json:"tools"`
	Think    bool      `json:"think"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

// identifiers: every field and variable name in the tree (Ollama's template.Identifiers).
func identifiers(n parse.Node) []string {
	switch n := n.(type) {
	case *parse.ListNode:
		var names []string
		for _, c := range n.Nodes {
			names = append(names, identifiers(c)...)
		}
		return names
	case *parse.TemplateNode:
		return identifiers(n.Pipe)
	case *parse.ActionNode:
		return identifiers(n.Pipe)
	case *parse.BranchNode:
		names := identifiers(n.Pipe)
		for _, l := range []*parse.ListNode{n.List, n.ElseList} {
			if l != nil {
				names = append(names, identifiers(l)...)
			}
		}
		return names
	case *parse.IfNode:
		return identifiers(&n.BranchNode)
	case *parse.RangeNode:
		return identifiers(&n.BranchNode)
	case *parse.WithNode:
		return identifiers(&n.BranchNode)
	case *parse.PipeNode:
		if n == nil {
			return nil
		}
		var names []string
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				names = append(names, identifiers(a)...)
			}
		}
		return names
	case *parse.FieldNode:
		return n.Ident
	case *parse.VariableNode:
		return n.Ident
	}
	return nil
}

// collate: Ollama's template.collate.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func run() error {
	var req Request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		return fmt.Errorf("reading the request on stdin: %w", err)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		return fmt.Errorf("parsing the template: %w", err)
	}
	usesMessages := false
	for _, t := range tmpl.Templates() {
		if t.Tree == nil {
			continue
		}
		for _, name := range identifiers(t.Tree.Root) {
			if strings.ToLower(name) == "messages" {
				usesMessages = true
			}
		}
	}
	if !usesMessages {
		// Ollama would render such a template turn by turn with .Prompt/.Response (its legacy path)
		return fmt.Errorf("the template does not use .Messages; only Ollama's .Messages path is rendered here")
	}
	msgs := req.Messages
	if len(msgs) > 0 && msgs[0].Role != "system" && req.System != "" {
		msgs = append([]Message{{Role: "system", Content: req.System}}, msgs...)
	}
	system, messages := collate(msgs)
	return tmpl.Execute(os.Stdout, map[string]any{
		"System":     system,
		"Messages":   messages,
		"Tools":      req.Tools,
		"Response":   "",
		"Think":      req.Think,
		"IsThinkSet": false,
	})
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "ollama_template:", err)
		os.Exit(1)
	}
}
